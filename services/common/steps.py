"""Pipeline steps: what the orchestrator sends a service and what the service reports back.

The orchestrator sends a ``StepRequest`` to the task ``<service>.step`` (queue ``<service>``); the
service runs the step through its core and sends a ``StepReport`` to ``orchestrator.report``
(queue ``orchestrator``). The orchestrator alone decides what comes next: no Celery chains.
Messages carry ids and object keys, never image, embedding or mask bytes.

``run_step`` is the one place a step's errors become outcomes, shared by the Celery tasks and the
in-process (embedded) runner:
- bad input (``InvalidInput``, ``NotFound``, ``FailedPrecondition``, a malformed message) fails
  the item at once with the reason;
- ``TransientError`` (storage, network) is retried with exponential backoff, up to
  ``max_attempts``; then the report says ``dead_letter`` and the orchestrator records it;
- a ``StorageFault`` (the store full or unavailable) is retried with the same backoff, capped at
  60 s, for as long as it lasts, never dead-lettered: it is the store's condition, not the item's,
  so failing the item would throw away good work that succeeds as soon as space is freed (within
  60 s of it). Operators learn of it from ``dataengine_storage_faults_total`` and the
  ``StoreFull`` / ``StoreUnavailable`` alerts, not from failed items;
- anything else is a bug in a stage: the item fails with the exception's text, the worker goes on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from celery import Celery
from celery.exceptions import Reject

from services.common.errors import DataEngineError, InvalidInput, StorageFault, TransientError
from services.common.queues import TaskOutcome

log = logging.getLogger(__name__)

# step -> the service whose worker runs it
STEP_SERVICE = {"embed": "embedder", "propose": "concepts", "decode": "decoder", "verify": "verifier"}
REPORT_TASK = "orchestrator.report"


def step_task_name(step: str) -> str:
    return f"{STEP_SERVICE[step]}.step"


# Message headers naming the item and step a queued message is about (and when the step was sent):
# the orchestrator's sweep reads them from queued and unacknowledged messages, whatever the body's
# serializer (a signed body cannot be read without its key).
HEADER_ITEM, HEADER_STEP, HEADER_SENT = "dataengine_item", "dataengine_step", "dataengine_sent_at"


def step_headers(item_id: str, step: str, sent_at: float) -> dict:
    return {HEADER_ITEM: item_id, HEADER_STEP: step, HEADER_SENT: sent_at}


def backoff_s(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1): 1, 2, 4, ... 60."""
    return float(min(2 ** (attempt - 1), 60))


def retry_later(task, exc: Exception, attempt: int) -> None:
    """Raise Celery's ``Retry`` of ``task`` after ``backoff_s(attempt)``. When the broker cannot
    take the retry either (Redis restarting), Celery raises ``Reject``: said in one log line, and
    the caller drops the message; the orchestrator's sweep sends the step again (sweep.py)."""
    try:
        raise task.retry(exc=exc, countdown=backoff_s(attempt))
    except Reject as rejected:
        log.warning("retry not queued (%s): broker unreachable; the message is dropped and the "
                    "orchestrator's sweep sends the step again", rejected.reason)


def send_report(app: Celery, report: "StepReport", sent_at: float, attempts: int = 4,
                sleep: Callable[[float], None] = time.sleep) -> bool:
    """Send a step's report to the orchestrator, retrying a broker that is away (a Redis restart)
    with backoff; False when it stayed away (logged in one line: the sweep sends the step again)."""
    for attempt in range(1, attempts + 1):
        try:
            app.send_task(REPORT_TASK, args=[report.to_json()], queue="orchestrator",
                          headers=step_headers(report.item_id, report.step, sent_at))
            return True
        except Exception as exc:  # noqa: BLE001 - kombu's and redis' connection errors alike
            if attempt == attempts:
                log.warning("report of %s %s not sent after %d attempts: %s: %s", report.step, report.item_id,
                            attempts, type(exc).__name__, exc)
                return False
            sleep(backoff_s(attempt))
    return False


@dataclass
class StepRequest:
    """One step for one item. inputs: object keys and small facts the step needs. sent_at: unix
    seconds the orchestrator sent it (0: unknown); it also travels in the message's headers
    (``step_headers``), where the orchestrator's sweep reads it without decoding bodies."""

    item_id: str
    step: str
    inputs: dict = field(default_factory=dict)
    sent_at: float = 0.0

    def to_json(self) -> dict:
        return {"item_id": self.item_id, "step": self.step, "inputs": dict(self.inputs), "sent_at": self.sent_at}

    @classmethod
    def from_json(cls, d) -> "StepRequest":
        if not isinstance(d, dict) or not isinstance(d.get("item_id"), str) or not d.get("item_id"):
            raise InvalidInput(f"a step request needs an item_id, got {d!r:.200}")
        if d.get("step") not in STEP_SERVICE:
            raise InvalidInput(f"unknown step {d.get('step')!r}; one of {', '.join(STEP_SERVICE)}")
        if not isinstance(d.get("inputs", {}), dict):
            raise InvalidInput(f"step inputs must be a JSON object, got {type(d.get('inputs')).__name__}")
        sent_at = d.get("sent_at", 0.0)
        if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool):
            raise InvalidInput(f"step request sent_at must be unix seconds, got {sent_at!r:.50}")
        return cls(item_id=d["item_id"], step=d["step"], inputs=dict(d.get("inputs", {})), sent_at=float(sent_at))

    def need(self, name: str, kind: type = str):
        """The input ``name``, checked to be a ``kind`` (a missing or mistyped input is bad input)."""
        value = self.inputs.get(name)
        if not isinstance(value, kind) or (kind is str and not value):
            raise InvalidInput(f"step {self.step!r} of item {self.item_id} needs input {name!r} "
                               f"({kind.__name__}), got {value!r:.100}")
        return value


@dataclass
class StepReport:
    """A step's result for one item. attempts: how many times it ran (retries included).
    elapsed_s: seconds the last attempt's handler ran (model and storage work, no queueing)."""

    item_id: str
    step: str
    outcome: TaskOutcome
    attempts: int = 1
    dead_letter: bool = False
    elapsed_s: float = 0.0

    def to_json(self) -> dict:
        return {"item_id": self.item_id, "step": self.step, "outcome": self.outcome.to_json(),
                "attempts": self.attempts, "dead_letter": self.dead_letter, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_json(cls, d) -> "StepReport":
        try:
            return cls(item_id=str(d["item_id"]), step=str(d["step"]), outcome=TaskOutcome.from_json(d["outcome"]),
                       attempts=int(d.get("attempts", 1)), dead_letter=bool(d.get("dead_letter", False)),
                       elapsed_s=float(d.get("elapsed_s", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed step report {d!r:.200}: {exc!r}") from None


StepHandler = Callable[[StepRequest], dict]  # returns the outputs; raises DataEngineError on failure


def run_step(handler: StepHandler, request: StepRequest) -> TaskOutcome:
    """Run one attempt. ``TransientError`` propagates (the caller retries); all else is an outcome."""
    try:
        return TaskOutcome(ok=True, outputs=handler(request))
    except TransientError:
        raise
    except DataEngineError as exc:
        log.info("step failed", extra={"task": request.step, "key": request.item_id, "code": exc.code.name})
        return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name)
    except Exception as exc:  # noqa: BLE001 - a stage bug fails this item, not the worker
        log.exception("step crashed", extra={"task": request.step, "key": request.item_id})
        return TaskOutcome(ok=False, reason=f"{type(exc).__name__}: {exc}", code="INTERNAL")


def register_step_task(app: Celery, service: str, handler_factory: Callable[[], StepHandler],
                       max_attempts: int) -> None:
    """Register ``<service>.step`` on ``app``: run the step, report to the orchestrator queue.

    handler_factory: gives the step handler (built on first use, so the model loads lazily).
    """

    # ignore_result: the report goes to the orchestrator queue; a stored result would be one
    # more Redis write per step that nobody reads.
    @app.task(name=f"{service}.step", bind=True, shared=False, max_retries=None, ignore_result=True)
    def step(self, request_json) -> dict:
        attempt = self.request.retries + 1
        try:
            request = StepRequest.from_json(request_json)
        except InvalidInput as exc:  # no item to report to: log it and drop the message
            log.error("malformed step message dropped: %s", exc)
            return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name).to_json()
        started = time.perf_counter()
        try:
            outcome = run_step(handler_factory(), request)
            dead = False
        except TransientError as exc:
            if attempt < max_attempts or isinstance(exc, StorageFault):
                if attempt >= max_attempts:  # the store's trouble: retried until it clears (see above)
                    log.warning("step %s of %s: %s; still retrying after %d attempts", request.step,
                                request.item_id, exc, attempt)
                retry_later(self, exc, attempt)
                return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name).to_json()
            outcome = TaskOutcome(ok=False, reason=f"{exc} (gave up after {attempt} attempts)", code=exc.code.name)
            dead = True
        report = StepReport(request.item_id, request.step, outcome, attempts=attempt, dead_letter=dead,
                            elapsed_s=round(time.perf_counter() - started, 6))
        send_report(app, report, request.sent_at)
        return outcome.to_json()
