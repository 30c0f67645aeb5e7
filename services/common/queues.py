"""The Celery app: one queue per service on Redis, JSON only, at-least-once delivery."""

from __future__ import annotations

import glob
from dataclasses import asdict, dataclass, field
from pathlib import Path

from celery import Celery
from kombu import Queue

from services.common.errors import FailedPrecondition
from services.common.settings import Settings

SERVICES = ("embedder", "decoder", "concepts", "verifier", "orchestrator")
MODEL_QUEUES = ("embedder", "decoder", "concepts", "verifier")


def create_celery(settings: Settings) -> Celery:
    """A Celery app whose tasks named ``<service>.<task>`` route to the queue ``<service>``.

    acks_late + reject_on_worker_lost: a task whose worker dies is redelivered, never lost.
    prefetch 1: a model worker holds at most one message beyond the one it runs, so autoscaling
    on queue depth sees the real backlog.
    """
    app = Celery("dataengine", broker=settings.broker_url, backend=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(name) for name in SERVICES],
        task_default_queue="orchestrator",
        task_routes=[_route],
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport_options(settings.visibility_timeout_s),
        worker_hijack_root_logger=False,
        # task events for Flower and `celery events`: received/started/succeeded from the workers,
        # sent from the producers
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    if settings.queue_signing_key is not None:
        sign_messages(app, settings)
    return app


def sign_messages(app: Celery, settings: Settings) -> None:
    """Celery's message signing: every task message this process sends is signed with its key
    (RSA, SHA-256) and every one it takes must carry a valid signature by a certificate in
    ``settings.queue_signing_store``; anything else, plain JSON included, is discarded unrun with
    an error in the worker's log. Results stay plain JSON (they hold only outcomes and keys).
    Process-wide: it sets kombu's serializer registry (one settings object per process)."""
    if not Path(settings.queue_signing_store).exists() and not glob.glob(settings.queue_signing_store):
        raise FailedPrecondition(f"DATAENGINE_QUEUE_SIGNING_STORE {settings.queue_signing_store!r} "
                                 "names no certificate")
    app.conf.update(task_serializer="auth", accept_content=["auth"], result_accept_content=["json"],
                    security_key=str(settings.queue_signing_key),
                    security_certificate=str(settings.queue_signing_cert),
                    security_cert_store=settings.queue_signing_store, security_digest="sha256")
    try:
        app.setup_security(allowed_serializers=["json"], serializer="json")  # auth: registered by it
    except Exception as exc:  # noqa: BLE001 - celery's SecurityError, ValueError, OSError: all configuration
        raise FailedPrecondition(f"queue message signing misconfigured: {exc}") from exc


def transport_options(visibility_timeout_s: int) -> dict:
    """Redis transport options. A message whose worker died unacknowledged (SIGKILL, OOM, lost
    node) goes back to its queue ``visibility_timeout_s`` after delivery; kombu looks for such
    messages every ``unacked_restore_interval`` seconds. The timeout must exceed the longest task:
    a task still running past it is delivered a second time (harmless, as every step overwrites
    its own output, but wasted work)."""
    return {"visibility_timeout": visibility_timeout_s,
            "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1}


def _route(name: str, args, kwargs, options, task=None, **kw) -> dict | None:
    service = name.split(".", 1)[0]
    return {"queue": service} if service in SERVICES else None


@dataclass
class TaskOutcome:
    """What a service task returns (JSON): done with its outputs, or failed with the reason."""

    ok: bool
    outputs: dict = field(default_factory=dict)  # object keys and small facts, never bytes
    reason: str = ""
    code: str = ""  # gRPC status name of the failure, e.g. "INVALID_ARGUMENT"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TaskOutcome":
        return cls(ok=bool(d["ok"]), outputs=dict(d.get("outputs", {})), reason=d.get("reason", ""),
                   code=d.get("code", ""))
