"""Celery task ``embedder.embed`` on queue ``embedder``: object keys in, embedding keys out (JSON).

Bad input is an outcome, not an exception: the task returns ``ok=False`` with the reason and the
worker goes on. Storage trouble (``TransientError``) is retried with exponential backoff.
"""

from __future__ import annotations

import logging
from typing import Callable

from celery import Celery

from services.common.errors import DataEngineError, InvalidInput, TransientError
from services.common.queues import TaskOutcome
from services.embedder.core import EmbedderCore
from services.embedder.types import DEFAULT_CROP_OVERLAP_RATIO

log = logging.getLogger(__name__)

TASK_NAME = "embedder.embed"
MAX_RETRIES = 5


def register_tasks(app: Celery, core_factory: Callable[[], EmbedderCore]) -> None:
    """Register ``embedder.embed`` on ``app``; ``core_factory`` gives the (shared) core."""

    # shared=False: a shared task would also be registered, with this core_factory, on every Celery
    # app created later in the process (tests, embedded mode).
    @app.task(name=TASK_NAME, shared=False, autoretry_for=(TransientError,), retry_backoff=True, retry_backoff_max=120,
              retry_jitter=True, max_retries=MAX_RETRIES)
    def embed(image_keys: list[str], crop_n_layers: int = 0,
              crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO) -> dict:
        """image_keys: object keys of encoded images. Returns a TaskOutcome as JSON:
        outputs = {"image_ids": [...], "embedding_keys": [[full image, crops...], ...]}."""
        try:
            if not isinstance(image_keys, list) or not all(isinstance(k, str) for k in image_keys):
                raise InvalidInput(f"image_keys must be a list of object keys, got {image_keys!r:.200}")
            layers, overlap = _number(crop_n_layers, int, "crop_n_layers"), _number(
                crop_overlap_ratio, float, "crop_overlap_ratio")
            results = core_factory().embed(image_keys, layers, overlap)
        except TransientError:
            raise  # autoretry_for
        except DataEngineError as exc:
            log.info("embed failed", extra={"task": TASK_NAME, "code": exc.code.name})
            return TaskOutcome(ok=False, reason=str(exc), code=exc.code.name).to_json()
        return TaskOutcome(ok=True, outputs={"image_ids": [r.image_id for r in results],
                                             "embedding_keys": [r.keys for r in results]}).to_json()


def _number(value, kind: type, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)
