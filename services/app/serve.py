"""``dataengine serve SERVICE``: one process with the service's gRPC server and Celery worker,
both over one core object (the model is loaded once)."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from celery.signals import worker_ready

from services.common.auth import TokenFile
from services.common.grpc_server import build_server, serve_until_signal
from services.common.logs import setup_logging
from services.common.metrics import (MODEL_LOAD_SECONDS, EngineCollector, instrument_celery,
                                     serve_metrics)
from services.common.queues import SERVICES as QUEUES, create_celery
from services.common.settings import Settings
from services.common.steps import StepHandler, register_step_task
from services.common.storage import open_store
from services.common.tls import TlsFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceParts:
    """What ``serve`` needs of a service.

    make_core: builds the core (loads the model) from the settings.
    add_to_server: (grpc.Server, core) -> the full service names (for health and reflection).
    register_tasks: (Celery, core_factory, max_attempts) -> None, the service's own Celery tasks.
    make_step: core -> the pipeline step handler (registered as ``<service>.step``), or None.
    """

    make_core: Callable[[Settings], object]
    add_to_server: Callable
    register_tasks: Callable | None = None
    make_step: Callable[[object], StepHandler] | None = None
    collector: Callable[[object], object] | None = None  # core -> a Prometheus collector of its own
    background: Callable[[object, Settings], Callable[[], None] | None] | None = None  # starts a loop; -> its stop


def _embedder() -> ServiceParts:
    from services.common.sam_models import load_from_settings
    from services.embedder import servicer, step, tasks
    from services.embedder.core import EmbedderCore

    def make(settings: Settings) -> EmbedderCore:
        return EmbedderCore(load_from_settings(settings), open_store(settings), settings.embed_batch_size,
                            settings.max_image_pixels)

    return ServiceParts(make, servicer.add_to_server, tasks.register_tasks, step.make_handler)


def _decoder() -> ServiceParts:
    from services.common.sam_models import load_from_settings
    from services.decoder import servicer, step, tasks
    from services.decoder.core import DecoderCore

    def make(settings: Settings) -> DecoderCore:
        return DecoderCore(load_from_settings(settings), open_store(settings), settings.embedding_cache_size)

    return ServiceParts(make, servicer.add_to_server, tasks.register_tasks,
                        lambda core: step.make_handler(core, core.store))


def _concepts() -> ServiceParts:
    from services.concepts import servicer, step, tasks
    from services.concepts.core import ConceptsCore

    return ServiceParts(ConceptsCore.from_settings, servicer.add_to_server, tasks.register_tasks,
                        lambda core: step.make_handler(core, core.store))


def _verifier() -> ServiceParts:
    from services.verifier import servicer, step, tasks
    from services.verifier.core import VerifierCore

    return ServiceParts(VerifierCore.from_settings, servicer.add_to_server, tasks.register_tasks,
                        lambda core: step.make_handler(core, core.store))


def _orchestrator() -> ServiceParts:
    from services.orchestrator import servicer, tasks
    from services.orchestrator.dispatch import CeleryDispatcher
    from services.orchestrator.engine import Orchestrator
    from services.orchestrator.index import RedisIndex, queue_depths
    from services.orchestrator.model import QUEUE_BANDS, ItemState, Stage
    from services.orchestrator.sweep import QueueProbe, Sweep, start_sweeper

    def make(settings: Settings) -> Orchestrator:
        return Orchestrator.from_settings(
            settings, open_store(settings), RedisIndex(settings.broker_url), CeleryDispatcher(create_celery(settings)),
            queue_depths=lambda: queue_depths(settings.broker_url, QUEUES))

    def sweeper(core: Orchestrator, settings: Settings):
        if not settings.sweep_interval_s:
            return None
        sweep = Sweep(core, QueueProbe(settings.broker_url), settings.step_grace_s, settings.step_deadline_s)
        return start_sweeper(sweep, settings.sweep_interval_s)

    known = {"state": tuple(s.name.lower() for s in ItemState), "stage": tuple(s.name.lower() for s in Stage),
             "band": QUEUE_BANDS, "queue": tuple(QUEUES)}
    return ServiceParts(make, servicer.add_to_server, tasks.register_tasks,
                        collector=lambda core: EngineCollector(core.stats, known), background=sweeper)


SERVICES: dict[str, Callable[[], ServiceParts]] = {
    "embedder": _embedder, "decoder": _decoder, "concepts": _concepts, "verifier": _verifier,
    "orchestrator": _orchestrator}


def _register(app, service: str, parts: ServiceParts, core_factory: Callable[[], object],
              settings: Settings) -> None:
    if parts.register_tasks is not None:
        parts.register_tasks(app, core_factory, settings.max_attempts)
    if parts.make_step is not None:
        handler: list[StepHandler] = []

        def handler_factory() -> StepHandler:
            if not handler:
                handler.append(parts.make_step(core_factory()))
            return handler[0]

        register_step_task(app, service, handler_factory, settings.max_attempts)


def make_worker_app(service: str, settings: Settings):
    """The Celery app of ``service`` with its tasks registered over a lazily built core
    (for ``celery -A services.workers.<service> worker``)."""
    parts = SERVICES[service]()
    core: list = []

    def core_factory():
        if not core:
            started = time.perf_counter()
            core.append(parts.make_core(settings))
            MODEL_LOAD_SECONDS.labels(service).set(time.perf_counter() - started)
        return core[0]

    app = create_celery(settings)
    _register(app, service, parts, core_factory, settings)
    if parts.background is not None:  # the orchestrator's sweep, once the worker runs
        worker_ready.connect(lambda **_: parts.background(core_factory(), settings), weak=False)
    if settings.metrics_port:
        instrument_celery()
    serve_metrics(settings.metrics_port, settings.host)
    return app


def open_tokens(settings: Settings) -> TokenFile | None:
    """The tokens file the settings name; without one every caller may do everything: said loudly."""
    if settings.auth_tokens_file is None:
        log.warning("no DATAENGINE_AUTH_TOKENS_FILE: any client may call every RPC; set it in a deployment")
        return None
    return TokenFile(settings.auth_tokens_file)


def run_service(service: str, settings: Settings, grpc_server: bool = True, worker: bool = True) -> None:
    """Serve until SIGTERM: gRPC in a thread pool, the Celery worker (solo pool) in the main thread."""
    setup_logging(settings.log_level)
    early_stop = _EarlyStop() if worker else None
    parts = SERVICES[service]()
    tokens = open_tokens(settings) if grpc_server else None
    started = time.perf_counter()
    core = parts.make_core(settings)
    MODEL_LOAD_SECONDS.labels(service).set(time.perf_counter() - started)
    serve_metrics(settings.metrics_port, settings.host,
                  [parts.collector(core)] if parts.collector is not None else [])
    if worker and settings.metrics_port:
        instrument_celery()
    stop_background = parts.background(core, settings) if parts.background is not None else None
    server = None
    if grpc_server:
        address = f"{settings.host}:{settings.port_of(service)}"
        server, port = build_server(lambda s: parts.add_to_server(s, core), address,
                                    settings.max_message_bytes, settings.grpc_workers, tokens,
                                    TlsFiles.from_settings(settings), settings.grpc_reflection,
                                    metrics=settings.metrics_port > 0)
        log.info("gRPC serving", extra={"service": service, "key": f"port {port}"})
    if not worker:
        try:
            serve_until_signal(server, settings.shutdown_grace_s)
        finally:
            if stop_background is not None:
                stop_background()
        return
    if server is not None:
        server.start()
    app = create_celery(settings)
    _register(app, service, parts, lambda: core, settings)
    worker_ready.connect(early_stop.replay, weak=False)
    try:
        # Solo pool: the model lives in this process once; CUDA does not survive fork anyway.
        # Celery turns SIGTERM into a warm shutdown: the running task finishes, then we return.
        app.worker_main(["worker", "-Q", service, "-P", "solo", "-c", "1", "-n", f"{service}@%h",
                         "--without-gossip", "--without-mingle", "-l", settings.log_level])
    finally:
        if stop_background is not None:
            stop_background()
        if server is not None:
            server.stop(settings.shutdown_grace_s).wait()


class _EarlyStop:
    """A SIGTERM before Celery's own handler is in place (the gRPC server already answers while the
    worker starts) would kill the process by default; this handler keeps it, and ``replay`` (on
    ``worker_ready``, Celery's handler installed) sends it again: a warm shutdown, exit code 0."""

    def __init__(self) -> None:
        self.received = False
        signal.signal(signal.SIGTERM, self._keep)

    def _keep(self, signum, frame) -> None:
        self.received = True

    def replay(self, **_) -> None:
        if self.received:
            os.kill(os.getpid(), signal.SIGTERM)
