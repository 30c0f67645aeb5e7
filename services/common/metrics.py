"""Prometheus metrics of one process, on ``/metrics`` at ``DATAENGINE_METRICS_PORT`` (0: none).

Names and labels follow Prometheus conventions (base units: seconds; counters end in ``_total``).
The gRPC ones are py-grpc-prometheus's, so its dashboards work unchanged:

- ``grpc_server_started_total`` / ``grpc_server_handled_total`` (counters) and
  ``grpc_server_handling_seconds`` (histogram), labelled ``grpc_type``, ``grpc_service``,
  ``grpc_method`` (and ``grpc_code`` for handled), from one server interceptor (``GrpcMetrics``);
- ``dataengine_tasks_total{service, task, step, outcome}`` and ``dataengine_task_seconds{service,
  task, step}``: every Celery task this process runs, pipeline steps included (``step``: embed,
  propose, decode, verify, report; the task's name for the others); outcome ``ok``, ``failed`` (an
  outcome that names a problem), ``retry`` or ``error`` (an exception);
- ``dataengine_model_load_seconds{service}``: how long the service's core took to build (the model load);
- ``dataengine_embedding_cache_requests_total{result="hit"|"miss"}``: the decoder's embedding cache.
- ``dataengine_storage_faults_total{kind="full"|"unavailable"}``: store operations that failed for
  the store's condition (``StorageFull``, ``StorageUnavailable``), counted where they are raised.

The orchestrator adds its view of the engine at scrape time (``EngineCollector``): items by state
and by stage, queue depth (ready and unacknowledged), dead letters, the review backlog and its
oldest item's age; and counts the items it settles, the human decisions and the expired leases.
The studio counts its annotators, submits, clicks and HTTP requests (the README's table lists all).

One registry per process: the services run Celery's solo pool and the studio one uvicorn process,
so nothing forks after start. Where something does (Celery's prefork pool, uvicorn or gunicorn
with several workers), set ``PROMETHEUS_MULTIPROC_DIR`` to an empty folder: prometheus-client's
multiprocess mode then writes every process's samples there and ``/metrics`` sums them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

import grpc
from prometheus_client import (REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess,
                               start_http_server)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# from 5 ms (a cached Predict on a GPU) to a minute (GenerateMasks with crops on a CPU)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

GRPC_STARTED = Counter("grpc_server_started_total", "Total number of RPCs started on the server.", _GRPC_LABELS)
GRPC_HANDLED = Counter("grpc_server_handled_total",
                       "Total number of RPCs completed on the server, regardless of success or failure.",
                       (*_GRPC_LABELS, "grpc_code"))
GRPC_SECONDS = Histogram("grpc_server_handling_seconds",
                         "Response latency (seconds) of gRPC calls handled by the server.", _GRPC_LABELS,
                         buckets=LATENCY_BUCKETS)
TASKS = Counter("dataengine_tasks_total", "Celery tasks run by this process, by outcome.",
                ("service", "task", "step", "outcome"))
TASK_SECONDS = Histogram("dataengine_task_seconds", "Run time of the Celery tasks of this process (seconds).",
                         ("service", "task", "step"), buckets=LATENCY_BUCKETS)
MODEL_LOAD_SECONDS = Gauge("dataengine_model_load_seconds", "Time to build the service's core, its model "
                           "load included (seconds).", ("service",), multiprocess_mode="max")
EMBEDDING_CACHE = Counter("dataengine_embedding_cache_requests_total",
                          "Embedding lookups of the decoder's in-memory cache, by result.", ("result",))
# the orchestrator's events (its scrape-time view is EngineCollector's)
ITEMS_SETTLED = Counter("dataengine_items_settled_total", "Items the pipeline settled (accepted, review, "
                        "rejected, failed), by state; rate() * 60: items settled per minute.", ("state",))
FAILURE_MODES_FOUND = Counter("dataengine_failure_modes_total", "Failure modes of the items the verifier routed to "
                              "a human, by mode (active mining; an item counts once per mode).", ("mode",))
REVIEWS = Counter("dataengine_reviews_total", "Human decisions submitted, by kind (review, audit) and decision "
                  "(accept, discard).", ("kind", "decision"))
STEPS_RESENT = Counter("dataengine_steps_resent_total", "Steps the orchestrator's sweep sent again because "
                       "their message or report was lost, by step.", ("step",))
# every process with a store (storage.py counts where it raises StorageFull / StorageUnavailable)
STORAGE_FAULTS = Counter("dataengine_storage_faults_total", "Object-store operations that failed because the "
                         "store is full (no space or quota) or unavailable (read-only, unreachable, failing), "
                         "by kind; each is retried.", ("kind",))
for _kind in ("full", "unavailable"):
    STORAGE_FAULTS.labels(_kind)  # 0 from the first scrape, so increase() sees the first fault
LEASE_EXPIRIES = Counter("dataengine_lease_expiries_total", "Review leases that expired without a submit and "
                         "were handed to the next claimant.")
# the studio's (one per studio process)
ACTIVE_WINDOW_S = 300.0
STUDIO_ACTIVE = Gauge("dataengine_studio_active_annotators", "Annotators who sent a request in the last "
                      "five minutes.", multiprocess_mode="max")
STUDIO_SUBMITS = Counter("dataengine_studio_submits_total", "Submissions through the studio, by decision "
                         "(accept, discard).", ("decision",))
# a click on a warm embedding takes tens of milliseconds on a CPU; finer buckets than the RPCs'
CLICK_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
STUDIO_CLICK_SECONDS = Histogram("dataengine_studio_click_seconds", "A click's round trip in the studio "
                                 "server: request in to candidates out, the decoder call included (seconds).",
                                 buckets=CLICK_BUCKETS)
HTTP_REQUESTS = Counter("dataengine_http_requests_total", "HTTP requests to the studio, by method, route "
                        "template and status code.", ("method", "route", "code"))
HTTP_SECONDS = Histogram("dataengine_http_request_seconds", "Latency of the studio's HTTP requests (seconds).",
                         ("method", "route"), buckets=LATENCY_BUCKETS)


def _split(method: str) -> tuple[str, str]:
    """"/dataengine.v1.Decoder/Predict" -> ("dataengine.v1.Decoder", "Predict")."""
    _, service, name = (method.split("/") + ["", ""])[:3]
    return service, name


class GrpcMetrics(grpc.ServerInterceptor):
    """Counts and times every unary RPC, refusals by the interceptors after it included (it goes
    first). Streaming RPCs (reflection, health Watch) are counted as started only."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, name = _split(handler_call_details.method)
        if handler is None:
            return handler
        if handler.unary_unary is None:
            kind = "bidi_stream" if handler.stream_stream else "server_stream" if handler.unary_stream else "client_stream"
            GRPC_STARTED.labels(kind, service, name).inc()
            return handler
        behaviour, labels = handler.unary_unary, ("unary", service, name)

        def run(request, context):
            GRPC_STARTED.labels(*labels).inc()
            started = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = behaviour(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except Exception:
                code = context.code() or grpc.StatusCode.UNKNOWN  # abort() set it before raising
                raise
            finally:
                GRPC_SECONDS.labels(*labels).observe(time.perf_counter() - started)
                GRPC_HANDLED.labels(*labels, code.name).inc()

        return grpc.unary_unary_rpc_method_handler(run, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


_celery_lock = threading.Lock()
_celery_on = False
_started: dict[str, float] = {}


def _task_labels(task, args) -> tuple[str, str, str]:
    name = getattr(task, "name", "") or ""
    service, _, short = name.partition(".")
    step = short
    if short == "step" and args and isinstance(args[0], dict):
        step = str(args[0].get("step", "step"))[:32]  # a pipeline step: which one
    elif short == "report":
        step = "report"
    return service, name, step


def instrument_celery() -> None:
    """Count and time every task this process runs (Celery's task_prerun / task_postrun signals);
    once per process."""
    global _celery_on
    from celery.signals import task_postrun, task_prerun

    with _celery_lock:
        if _celery_on:
            return
        _celery_on = True

    def before(task_id=None, **_):
        _started[task_id] = time.perf_counter()

    def after(task_id=None, task=None, args=None, retval=None, state=None, **_):
        started = _started.pop(task_id, None)
        labels = _task_labels(task, args or ())
        if state == "RETRY":
            outcome = "retry"
        elif state != "SUCCESS":
            outcome = "error"
        else:
            outcome = "failed" if isinstance(retval, dict) and retval.get("ok") is False else "ok"
        TASKS.labels(*labels, outcome).inc()
        if started is not None:
            TASK_SECONDS.labels(*labels).observe(time.perf_counter() - started)

    task_prerun.connect(before, weak=False)
    task_postrun.connect(after, weak=False)
    if multiprocess_dir():
        from celery.signals import worker_process_shutdown

        # a prefork child's live gauges must leave the sums when it exits
        worker_process_shutdown.connect(lambda pid=None, **_: multiprocess.mark_process_dead(pid or os.getpid()),
                                        weak=False)


class ActiveAnnotators:
    """Who sent a request in the last ``window_s`` seconds; ``seen`` updates the gauge
    ``dataengine_studio_active_annotators`` (``refresh`` before a scrape lets the idle ones go)."""

    def __init__(self, window_s: float = ACTIVE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.clock = window_s, clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def seen(self, name: str) -> None:
        with self._lock:
            self._last[name] = self.clock()
        self.refresh()

    def refresh(self) -> int:
        now = self.clock()
        with self._lock:
            for name in [n for n, t in self._last.items() if now - t > self.window_s]:
                del self._last[name]
            count = len(self._last)
        STUDIO_ACTIVE.set(count)
        return count


class EngineCollector:
    """The orchestrator's view at scrape time, from ``stats()`` (an ``Orchestrator.stats``, a
    ``Stats``: by_state, by_stage, queue_depths, dead_letters, review_waiting, review_oldest_s): gauges
    ``dataengine_items{state}``, ``dataengine_items_by_stage{stage}``,
    ``dataengine_queue_messages{queue}`` (ready plus unacknowledged), ``dataengine_dead_letters``,
    ``dataengine_review_backlog{band}`` (unclaimed items waiting for a human, per queue band) and
    ``dataengine_review_backlog_oldest_seconds`` (the age of the longest-waiting one)."""

    def __init__(self, stats: Callable[[], object], known: dict[str, tuple[str, ...]] | None = None) -> None:
        """known: label -> every value it can take ("state", "stage", "band", "queue"): each is
        exported, 0 where the engine has none, so rates and alerts work from the first scrape."""
        self.stats = stats
        self.known = known or {}

    def describe(self):
        return []  # collected fresh on every scrape

    def collect(self):
        try:
            stats = self.stats()
        except Exception as exc:  # noqa: BLE001 - a scrape during a Redis outage: said in the log, not a 500
            log.warning("engine metrics unavailable: %s", exc)
            return
        for name, doc, label, values in (
                ("dataengine_items", "Items by state.", "state", stats.by_state),
                ("dataengine_items_by_stage", "Items by stage.", "stage", stats.by_stage),
                ("dataengine_queue_messages", "Messages per Celery queue, ready plus unacknowledged.", "queue",
                 stats.queue_depths),
                ("dataengine_review_backlog", "Unclaimed items waiting for a human, per queue band.", "band",
                 stats.review_waiting)):
            family = GaugeMetricFamily(name, doc, labels=[label])
            for key, n in sorted({**dict.fromkeys(self.known.get(label, ()), 0), **values}.items()):
                family.add_metric([str(key)], float(n))
            yield family
        yield GaugeMetricFamily("dataengine_dead_letters", "Steps given up after their retries.",
                                value=float(stats.dead_letters))
        yield GaugeMetricFamily("dataengine_review_backlog_oldest_seconds", "How long the longest-waiting "
                                "unclaimed item has been in the review queue (seconds); 0 when none waits.",
                                value=float(stats.review_oldest_s))


def multiprocess_dir() -> str:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def scrape_registry(collectors=()) -> CollectorRegistry:
    """What ``/metrics`` reads: this process's registry, or in multiprocess mode a registry over
    every process's samples; ``collectors`` (collected at scrape time, e.g. ``EngineCollector``)
    join it."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    for collector in collectors:
        registry.register(collector)
    return registry


def serve_metrics(port: int, host: str = "0.0.0.0", collectors=()) -> None:
    """``/metrics`` on ``port`` in a daemon thread (prometheus_client's own server), with
    ``collectors`` added; 0: nothing."""
    if port:
        start_http_server(port, addr=host, registry=scrape_registry(collectors))
        log.info("metrics serving", extra={"key": f"port {port}"})
