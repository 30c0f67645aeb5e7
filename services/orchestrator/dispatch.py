"""How step requests reach the services: Celery queues (deployments) or an in-process loop
(the embedded mode of ``dataengine run``). Both run the same step handlers through
``services.common.steps.run_step`` and hand the same ``StepReport`` to ``Orchestrator.report``."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Mapping

from celery import Celery

from services.common.errors import StorageFault, TransientError
from services.common.steps import (StepHandler, StepReport, StepRequest, backoff_s, run_step, step_headers,
                                   step_task_name)
from services.common.queues import TaskOutcome

log = logging.getLogger(__name__)


class CeleryDispatcher:
    """Sends each step to its service's queue (task ``<service>.step``)."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, request: StepRequest) -> None:
        name = step_task_name(request.step)
        self.app.send_task(name, args=[request.to_json()], queue=name.split(".")[0],
                           headers=step_headers(request.item_id, request.step, request.sent_at))


class InlineDispatcher:
    """A FIFO of step requests run in this process by ``run``; reports go to ``on_report``.

    Transient errors are retried with the same backoff as the Celery tasks, up to
    ``max_attempts``; then the report is a dead letter, as in the distributed deployment. A
    ``StorageFault`` (the store full or unavailable) is retried for as long as it lasts, with the
    backoff capped at 60 s, and so is applying a report that meets one (as ``orchestrator.report``
    does): no item fails because the disk was full for a while (steps.py says why).
    """

    def __init__(self, handlers: Mapping[str, StepHandler], max_attempts: int = 5,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.handlers = handlers
        self.max_attempts = max_attempts
        self.queue: deque[StepRequest] = deque()
        self.sleep = sleep

    def send(self, request: StepRequest) -> None:
        self.queue.append(request)

    def run(self, on_report: Callable[[StepReport], object], on_step: Callable[[StepRequest], None] = None) -> int:
        """Run queued steps (and those they cause) until none is left; returns how many ran."""
        ran = 0
        while self.queue:
            request = self.queue.popleft()
            self._apply(on_report, self.run_one(request))
            ran += 1
            if on_step is not None:
                on_step(request)
        return ran

    def _apply(self, on_report: Callable[[StepReport], object], report: StepReport) -> None:
        attempt = 1
        while True:
            try:
                on_report(report)
                return
            except StorageFault as exc:
                log.warning("report of %s %s not applied: %s; retrying", report.step, report.item_id, exc)
                self.sleep(backoff_s(attempt))
                attempt += 1

    def run_one(self, request: StepRequest) -> StepReport:
        handler = self.handlers[request.step]
        attempt = 0
        while True:
            attempt += 1
            started = time.perf_counter()
            try:
                outcome = run_step(handler, request)
                return StepReport(request.item_id, request.step, outcome, attempts=attempt,
                                  elapsed_s=round(time.perf_counter() - started, 6))
            except TransientError as exc:
                if attempt >= self.max_attempts and not isinstance(exc, StorageFault):
                    outcome = TaskOutcome(ok=False, reason=f"{exc} (gave up after {attempt} attempts)",
                                          code=exc.code.name)
                    return StepReport(request.item_id, request.step, outcome, attempts=attempt, dead_letter=True)
                log.warning("step %s of %s: %s; retrying", request.step, request.item_id, exc)
                self.sleep(backoff_s(attempt))
