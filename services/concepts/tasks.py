"""Celery task ``concepts.propose`` on queue ``concepts``, for other systems: an image key, known
labels and caps in, the ``Proposal`` as JSON out. Thin over ``ConceptsCore.propose``, the same
call as gRPC ``Propose``; errors become outcomes as for every service task (``common.core_tasks``).
A model endpoint that times out is retried with backoff, then fails the task with the reason.
"""

from __future__ import annotations

from typing import Callable

from celery import Celery

from services.common.core_tasks import MAX_ATTEMPTS, register_core_task
from services.common.errors import InvalidInput
from services.concepts.core import ConceptsCore

TASK_NAME = "concepts.propose"


def register_tasks(app: Celery, core_factory: Callable[[], ConceptsCore], max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register ``concepts.propose`` on ``app``; ``core_factory`` gives the process's core."""

    def propose(image_key: str, known_labels: list[str] | None = None, max_positives: int = 0,
                max_negatives: int = 0, backend: str = "") -> dict:
        """image_key: the image's object key. known_labels: phrases known to be in it (None or []:
        none). max_positives, max_negatives: caps, 0 for the configured ones. backend: a registry
        name, "" for the configured one. Outputs: the proposal, ``{"phrases": [...],
        "hard_negatives": [...]}`` (``Proposal.to_json``; boxes and points in pixels)."""
        if not isinstance(image_key, str) or not image_key:
            raise InvalidInput(f"image_key must be an object key, got {image_key!r:.100}")
        labels = [] if known_labels is None else known_labels
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise InvalidInput(f"known_labels must be a list of strings, got {known_labels!r:.100}")
        if not isinstance(backend, str):
            raise InvalidInput(f"backend must be a registry name, got {backend!r:.100}")
        return core_factory().propose(image_key, labels, max_positives, max_negatives, backend).to_json()

    register_core_task(app, TASK_NAME, propose, max_attempts)
