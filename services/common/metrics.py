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

The orchestrator adds its view of the engine at scrape time (``EngineCollector``): items by state
and by stage, queue depth (ready and unacknowledged), dead letters, the review backlog.

One registry per process: the services run Celery's solo pool, so no process forks after start.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
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
                           "load included (seconds).", ("service",))
EMBEDDING_CACHE = Counter("dataengine_embedding_cache_requests_total",
                          "Embedding lookups of the decoder's in-memory cache, by result.", ("result",))


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


class EngineCollector:
    """The orchestrator's view at scrape time, from ``stats()`` (an ``Orchestrator.stats``: its
    ``by_state``, ``by_stage``, ``queue_depths``, ``dead_letters``, ``review_waiting``): gauges
    ``dataengine_items{state}``, ``dataengine_items_by_stage{stage}``,
    ``dataengine_queue_messages{queue}`` (ready plus unacknowledged), ``dataengine_dead_letters``,
    ``dataengine_review_backlog{band}`` (unclaimed items waiting for a human, per queue band)."""

    def __init__(self, stats: Callable[[], object]) -> None:
        self.stats = stats

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
            for key, n in sorted(values.items()):
                family.add_metric([str(key)], float(n))
            yield family
        yield GaugeMetricFamily("dataengine_dead_letters", "Steps given up after their retries.",
                                value=float(stats.dead_letters))


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """``/metrics`` on ``port`` in a daemon thread (prometheus_client's own server); 0: nothing."""
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)
        log.info("metrics serving", extra={"key": f"port {port}"})
