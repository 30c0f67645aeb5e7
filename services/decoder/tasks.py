"""Celery tasks of the decoder (queue ``decoder``): thin over DecoderCore, JSON in and out."""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from services.common.errors import DataEngineError, InvalidInput, TransientError
from services.common.queues import TaskOutcome
from services.decoder.core import DecoderCore
from services.decoder.params import params_from_json

log = logging.getLogger(__name__)

MAX_RETRIES = 5


def backoff_s(retries: int) -> int:
    """Seconds before retry number ``retries + 1``: 1, 2, 4, 8, 16."""
    return min(2 ** retries, 60)


def register_tasks(app: Celery, core_factory: Callable[[], DecoderCore]) -> None:
    """Register ``decoder.generate_masks`` on ``app``; ``core_factory`` returns the process's core."""

    # shared=False: the task closes over this app's core; it must not join apps created later.
    @app.task(name="decoder.generate_masks", bind=True, max_retries=MAX_RETRIES, shared=False)
    def generate_masks(self, embedding_key: str, params: dict | None = None) -> dict:
        """Automatic masks for a stored full-image embedding; returns a TaskOutcome as JSON.

        Bad input fails at once with the reason (no retry: it would fail the same way);
        storage trouble is retried with exponential backoff, then recorded as a failure.
        """
        try:
            if not isinstance(embedding_key, str):
                raise InvalidInput(f"embedding_key must be a string, got {type(embedding_key).__name__}")
            result = core_factory().generate(embedding_key, params_from_json(params))
        except TransientError as exc:
            if self.request.retries >= MAX_RETRIES:
                return TaskOutcome(ok=False, reason=f"{exc} (gave up after {MAX_RETRIES} retries)",
                                   code=exc.code.name).to_json()
            raise self.retry(exc=exc, countdown=backoff_s(self.request.retries))
        except DataEngineError as exc:
            log.info("task rejected", extra={"task": self.name, "code": exc.code.name})
            return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name).to_json()
        except Exception as exc:  # noqa: BLE001 - record the failure; the worker keeps running
            log.exception("task failed", extra={"task": self.name})
            return TaskOutcome(ok=False, reason=f"{type(exc).__name__}: {exc}", code="INTERNAL").to_json()
        return TaskOutcome(ok=True, outputs={"masks_key": result.masks_key, "count": len(result.masks),
                                             "image_id": result.image_id}).to_json()
