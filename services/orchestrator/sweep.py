"""The engine heals itself: a sweep re-sends the steps whose message or report was lost.

Every step the orchestrator sends is tracked in the index by its send time (``Orchestrator.send``)
until its report is applied. A step is lost when it was sent more than ``grace_s`` ago and is none
of: queued (the service's queue is FIFO, so a step sent before the oldest queued message of its
queue is no longer in it: one ``LINDEX`` per queue, from the message headers), held (delivered to a
worker and not acknowledged, or its report held by an orchestrator worker: kombu's ``unacked``
hash, as long as the workers' prefetch) or reported (a report still queued for the orchestrator:
while reports wait, only steps older than ``deadline_s`` are re-sent). A step held longer than
``deadline_s`` is re-sent too (a hung worker). Re-sending is idempotent (deterministic output
keys; a second report is ignored), as redeliveries are.

Cost per sweep: O(log n + due) in the index, O(queues) for the heads, O(held) for the
unacknowledged messages; never O(store). ``reconcile`` stays for disasters (Redis lost).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.common.errors import DataEngineError, InvalidInput, NotFound
from services.common.metrics import STEPS_RESENT
from services.common.steps import HEADER_ITEM, HEADER_SENT, HEADER_STEP, STEP_SERVICE
from services.orchestrator.engine import Orchestrator

log = logging.getLogger(__name__)

REPORT_QUEUE = "orchestrator"
# kombu keeps one list per priority step: the queue name, then name + "\x06\x16" + step.
_PRIORITY_SUFFIXES = [""] + [f"\x06\x16{p}" for p in range(1, 10)]


class QueueProbe:
    """What the Celery queues on Redis hold, read from message headers (kombu's Redis layout:
    publish ``LPUSH``, consume ``BRPOP``, so a list's oldest message is its last element)."""

    def __init__(self, redis_url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(redis_url)

    def oldest_sent(self, queue: str) -> float | None:
        """The send time of the oldest message waiting in ``queue``; None when none waits (or no
        waiting message says when it was sent)."""
        pipe = self.redis.pipeline(transaction=False)
        for suffix in _PRIORITY_SUFFIXES:
            pipe.lindex(queue + suffix, -1)
        times = [_headers(raw).get(HEADER_SENT) for raw in pipe.execute() if raw]
        times = [float(t) for t in times if isinstance(t, (int, float))]
        return min(times) if times else None

    def waiting(self, queue: str) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for suffix in _PRIORITY_SUFFIXES:
            pipe.llen(queue + suffix)
        return sum(pipe.execute())

    def held(self) -> dict[tuple[str, str], float]:
        """(item, step) -> when it was delivered, for every unacknowledged message: a step a
        worker runs, or its report the orchestrator applies. As long as the workers' prefetch."""
        delivered = {tag.decode(): t for tag, t in self.redis.zrange("unacked_index", 0, -1, withscores=True)}
        held: dict[tuple[str, str], float] = {}
        for tag, raw in self.redis.hgetall("unacked").items():  # O(held): prefetch x workers
            headers = _headers(raw, wrapped=True)
            item, step = headers.get(HEADER_ITEM), headers.get(HEADER_STEP)
            if isinstance(item, str) and isinstance(step, str):
                held[(item, step)] = delivered.get(tag.decode(), 0.0)
        return held


def _headers(raw: bytes, wrapped: bool = False) -> dict:
    """A kombu message's headers ({} when it is not one). ``wrapped``: an ``unacked`` entry,
    [message, exchange, routing key]."""
    try:
        message = json.loads(raw)
        message = message[0] if wrapped else message
        headers = message.get("headers") or {}
        return headers if isinstance(headers, dict) else {}
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return {}


@dataclass
class SweepResult:
    """One sweep: steps re-sent, steps found held or waiting on a report, stale entries dropped."""

    resent: list[tuple[str, str]] = field(default_factory=list)
    waiting: int = 0
    dropped: int = 0


@dataclass
class Sweep:
    core: Orchestrator
    probe: QueueProbe
    grace_s: float = 15.0
    deadline_s: float = 1800.0
    batch: int = 1000
    clock: Callable[[], float] = field(default=time.time)

    def run_once(self) -> SweepResult:
        result = SweepResult()
        now = self.clock()
        held = self.probe.held()
        reports_waiting = self.probe.waiting(REPORT_QUEUE) > 0
        for step, service in STEP_SERVICE.items():
            cutoff = now - self.grace_s
            head = self.probe.oldest_sent(service)
            if head is not None:
                cutoff = min(cutoff, head)  # sent after the oldest queued message: maybe queued still
            for item_id, sent_at in self.core.index.due(step, cutoff, self.batch):
                age = now - sent_at
                if (item_id, step) in held and now - held[(item_id, step)] < self.deadline_s:
                    result.waiting += 1
                elif reports_waiting and age < self.deadline_s:
                    result.waiting += 1  # its report may be among those queued
                elif self._resend(item_id, step):
                    result.resent.append((item_id, step))
                else:
                    result.dropped += 1
        return result

    def _resend(self, item_id: str, step: str) -> bool:
        """Send ``step`` of the item again if the manifest still needs it; else forget it."""
        try:
            item = self.core.load(item_id)
        except NotFound:
            item = None
        except InvalidInput as exc:  # an unreadable manifest: nothing to send; the rest of the sweep goes on
            log.warning("sweep skips %s %s: %s", step, item_id, exc)
            item = None
        request = next((r for r in self.core.pending_steps(item) if r.step == step), None) if item else None
        if request is None:  # reported meanwhile, settled, or gone: nothing to heal
            self.core.index.untrack(item_id, step)
            return False
        log.warning("step lost: sent again", extra={"task": step, "key": item_id})
        STEPS_RESENT.labels(step).inc()
        self.core.send(request)
        return True


def start_sweeper(sweep: Sweep, interval_s: float) -> Callable[[], None]:
    """Run ``sweep`` every ``interval_s`` in a daemon thread; returns a function that stops it.
    Errors (Redis restarting, the store away) are logged in one line and the next round tries again."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                result = sweep.run_once()
                if result.resent:
                    log.info("sweep re-sent %d lost steps", len(result.resent))
            except DataEngineError as exc:
                log.warning("sweep skipped: %s", exc)
            except Exception as exc:  # noqa: BLE001 - a Redis restart: retried next round, no traceback
                log.warning("sweep skipped: %s: %s", type(exc).__name__, exc)

    thread = threading.Thread(target=loop, name="sweep", daemon=True)
    thread.start()
    return stop.set
