"""Celery task ``orchestrator.report`` (queue ``orchestrator``): every service's step report
comes here, and the orchestrator decides the item's next step. Thin over ``Orchestrator.report``."""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from services.common.errors import DataEngineError, InvalidInput, TransientError
from services.common.steps import REPORT_TASK, StepReport, retry_later
from services.orchestrator.engine import Orchestrator
from services.orchestrator.export_tasks import register_export_tasks

log = logging.getLogger(__name__)


def register_tasks(app: Celery, core_factory: Callable[[], Orchestrator], max_attempts: int = 5) -> None:
    register_export_tasks(app, lambda: core_factory().store, max_attempts)  # orchestrator.export_shard

    @app.task(name=REPORT_TASK, bind=True, shared=False, max_retries=None, ignore_result=True)
    def report(self, report_json) -> dict:
        try:
            item = core_factory().report(StepReport.from_json(report_json))
        except InvalidInput as exc:  # a malformed message: nothing to apply it to
            log.error("malformed report dropped: %s", exc)
            return {"ok": False, "reason": str(exc)}
        except TransientError as exc:
            # Redis or the store away: retried with backoff (capped at 60 s) for as long as it
            # lasts, never dropped; a report whose retry cannot be queued is healed by the sweep.
            attempt = self.request.retries + 1
            if attempt >= max_attempts:
                log.warning("report for %s not applied after %d attempts, still retrying: %s",
                            report_json.get("item_id"), attempt, exc)
            retry_later(self, exc, attempt)
            return {"ok": False, "reason": str(exc)}
        except DataEngineError as exc:
            log.error("report rejected: %s", exc)
            return {"ok": False, "reason": str(exc)}
        return {"ok": True, "state": item.state.name if item else None}
