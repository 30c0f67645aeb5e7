"""``dataengine serve SERVICE``: one process with the service's gRPC server and Celery worker,
both over one core object (the model is loaded once)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from services.common.grpc_server import build_server, serve_until_signal
from services.common.logs import setup_logging
from services.common.queues import create_celery
from services.common.sam_models import load_from_settings
from services.common.settings import Settings
from services.common.storage import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceParts:
    make_core: Callable[[Settings], object]
    add_to_server: Callable  # (grpc.Server, core) -> list of full service names
    register_tasks: Callable  # (Celery, core_factory) -> None


def _embedder() -> ServiceParts:
    from services.embedder import servicer, tasks
    from services.embedder.core import EmbedderCore

    def make(settings: Settings) -> EmbedderCore:
        return EmbedderCore(load_from_settings(settings), open_store(settings), settings.embed_batch_size,
                            settings.max_image_pixels)

    return ServiceParts(make, servicer.add_to_server, tasks.register_tasks)


def _decoder() -> ServiceParts:
    from services.decoder import servicer, tasks
    from services.decoder.core import DecoderCore

    def make(settings: Settings) -> DecoderCore:
        return DecoderCore(load_from_settings(settings), open_store(settings), settings.embedding_cache_size)

    return ServiceParts(make, servicer.add_to_server, tasks.register_tasks)


SERVICES: dict[str, Callable[[], ServiceParts]] = {"embedder": _embedder, "decoder": _decoder}


def make_worker_app(service: str, settings: Settings):
    """The Celery app of ``service`` with its tasks registered over a lazily built core
    (for ``celery -A services.<service>.worker_app worker``)."""
    parts = SERVICES[service]()
    core: list = []

    def core_factory():
        if not core:
            core.append(parts.make_core(settings))
        return core[0]

    app = create_celery(settings)
    parts.register_tasks(app, core_factory)
    return app


def run_service(service: str, settings: Settings, grpc_server: bool = True, worker: bool = True) -> None:
    """Serve until SIGTERM: gRPC in a thread pool, the Celery worker (solo pool) in the main thread."""
    setup_logging(settings.log_level)
    parts = SERVICES[service]()
    core = parts.make_core(settings)
    server = None
    if grpc_server:
        address = f"{settings.host}:{settings.port_of(service)}"
        server, port = build_server(lambda s: parts.add_to_server(s, core), address,
                                    settings.max_message_bytes, settings.grpc_workers)
        log.info("gRPC serving", extra={"service": service, "key": f"port {port}"})
    if not worker:
        serve_until_signal(server, settings.shutdown_grace_s)
        return
    if server is not None:
        server.start()
    app = create_celery(settings)
    parts.register_tasks(app, lambda: core)
    try:
        # Solo pool: the model lives in this process once; CUDA does not survive fork anyway.
        # Celery turns SIGTERM into a warm shutdown: the running task finishes, then we return.
        app.worker_main(["worker", "-Q", service, "-P", "solo", "-c", "1", "-n", f"{service}@%h",
                         "--without-gossip", "--without-mingle", "-l", settings.log_level])
    finally:
        if server is not None:
            server.stop(settings.shutdown_grace_s).wait()
