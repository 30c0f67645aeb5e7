"""Celery task ``embedder.embed`` on queue ``embedder``: object keys in, embedding keys out (JSON).

Bad input is an outcome, not an exception: the task returns ``ok=False`` with the reason and the
worker goes on. Storage trouble (``TransientError``) is retried with exponential backoff
(``common.core_tasks``, as for every service task).
"""

from __future__ import annotations

from typing import Callable

from celery import Celery

from services.common.core_tasks import MAX_ATTEMPTS, register_core_task
from services.common.errors import InvalidInput
from services.embedder.core import EmbedderCore
from services.embedder.types import DEFAULT_CROP_OVERLAP_RATIO

TASK_NAME = "embedder.embed"


def register_tasks(app: Celery, core_factory: Callable[[], EmbedderCore], max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register ``embedder.embed`` on ``app``; ``core_factory`` gives the (shared) core."""

    def embed(image_keys: list[str], crop_n_layers: int = 0,
              crop_overlap_ratio: float = DEFAULT_CROP_OVERLAP_RATIO) -> dict:
        """image_keys: object keys of encoded images. Outputs: ``image_ids`` and
        ``embedding_keys`` (per image: the full image's key, then its crops')."""
        if not isinstance(image_keys, list) or not all(isinstance(k, str) for k in image_keys):
            raise InvalidInput(f"image_keys must be a list of object keys, got {image_keys!r:.200}")
        layers, overlap = _number(crop_n_layers, int, "crop_n_layers"), _number(
            crop_overlap_ratio, float, "crop_overlap_ratio")
        results = core_factory().embed(image_keys, layers, overlap)
        return {"image_ids": [r.image_id for r in results], "embedding_keys": [r.keys for r in results]}

    register_core_task(app, TASK_NAME, embed, max_attempts)


def _number(value, kind: type, name: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise InvalidInput(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)
