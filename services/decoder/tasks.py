"""Celery task ``decoder.generate_masks`` on queue ``decoder``: thin over DecoderCore, JSON in and
out; errors become outcomes as for every service task (``common.core_tasks``)."""

from __future__ import annotations

from typing import Callable

from celery import Celery

from services.common.core_tasks import MAX_ATTEMPTS, register_core_task
from services.common.errors import InvalidInput
from services.decoder.core import DecoderCore
from services.common.amg_params import params_from_json

TASK_NAME = "decoder.generate_masks"


def register_tasks(app: Celery, core_factory: Callable[[], DecoderCore], max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register ``decoder.generate_masks`` on ``app``; ``core_factory`` returns the process's core."""

    def generate_masks(embedding_key: str, params: dict | None = None) -> dict:
        """Automatic masks for a stored full-image embedding. embedding_key: the object key of
        a full-image embedding; params: grid-mask parameters (official names), None for the
        defaults. Outputs: ``masks_key`` (the SA-1B JSON), ``count``, ``image_id``."""
        if not isinstance(embedding_key, str):
            raise InvalidInput(f"embedding_key must be a string, got {type(embedding_key).__name__}")
        result = core_factory().generate(embedding_key, params_from_json(params))
        return {"masks_key": result.masks_key, "count": len(result.masks), "image_id": result.image_id}

    register_core_task(app, TASK_NAME, generate_masks, max_attempts)
