"""Celery task ``verifier.verify`` on queue ``verifier``, for other systems: an image key and its
image–noun-phrase pairs in, the ``Verification`` as JSON out. Thin over ``VerifierCore.verify``,
the same call as gRPC ``Verify``; errors become outcomes as for every service task
(``common.core_tasks``).

Queue messages carry object keys, never mask bytes: a pair names the SA-1B JSON holding its masks
(as ``decoder.generate_masks`` and the decode step write them, or as a caller stores them) and,
optionally, which of its annotations are the pair's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from celery import Celery

from services.common.core_tasks import MAX_ATTEMPTS, register_core_task
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import MaskRecord
from services.common.storage import ObjectStore
from services.verifier.core import PhrasePair, VerifierCore, union_of_masks
from services.verifier.step import read_grid_masks

TASK_NAME = "verifier.verify"


@dataclass(frozen=True)
class PairRef:
    """One pair of a ``verifier.verify`` message.

    phrase: the noun phrase. masks_key: object key of an SA-1B JSON (None: no masks: a hard
    negative, or a label nothing grounded). mask_indices: which of its annotations (0-based) are
    this pair's masks (None: all of them). is_negative: verify the phrase as absent.
    """

    phrase: str
    masks_key: str | None = None
    mask_indices: tuple[int, ...] | None = None
    is_negative: bool = False

    @classmethod
    def from_json(cls, d: Any, what: str) -> "PairRef":
        if not isinstance(d, dict):
            raise InvalidInput(f"{what} must be a JSON object with 'phrase', got {d!r:.100}")
        unknown = sorted(set(d) - {"phrase", "masks_key", "mask_indices", "is_negative"})
        if unknown:
            raise InvalidInput(f"{what} has unknown fields {unknown}; use phrase, masks_key, mask_indices, "
                               "is_negative")
        phrase, key, indices = d.get("phrase"), d.get("masks_key"), d.get("mask_indices")
        if not isinstance(phrase, str):
            raise InvalidInput(f"{what} needs 'phrase' as a string, got {phrase!r:.100}")
        if key is not None and (not isinstance(key, str) or not key):
            raise InvalidInput(f"{what} masks_key must be an object key, got {key!r:.100}")
        if indices is not None:
            if key is None:
                raise InvalidInput(f"{what} has mask_indices but no masks_key")
            if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                        for i in indices):
                raise InvalidInput(f"{what} mask_indices must be a list of integers >= 0, got {indices!r:.100}")
            indices = tuple(indices)
        negative = d.get("is_negative", False)
        if not isinstance(negative, bool):
            raise InvalidInput(f"{what} is_negative must be true or false, got {negative!r:.100}")
        return cls(phrase, key, indices, negative)

    def masks(self, documents: Callable[[str], list[MaskRecord]], what: str) -> list[MaskRecord]:
        """The pair's masks, read through ``documents`` (key -> that SA-1B JSON's masks)."""
        if self.masks_key is None:
            return []
        masks = documents(self.masks_key)
        if self.mask_indices is None:
            return masks
        beyond = [i for i in self.mask_indices if i >= len(masks)]
        if beyond:
            raise InvalidInput(f"{what} mask_indices {beyond} are beyond the {len(masks)} masks of "
                               f"{self.masks_key!r}")
        return [masks[i] for i in self.mask_indices]


def read_pairs(store: ObjectStore, pairs: Any, grid_masks_key: str | None = None
               ) -> tuple[list[PhrasePair], list[MaskRecord]]:
    """The message's pairs with their masks read from the store (each document once), and the
    image's grid masks: those of ``grid_masks_key``, or the union of the pairs' masks."""
    if not isinstance(pairs, list) or not pairs:
        raise InvalidInput(f"pairs must be a non-empty list of pair objects, got {pairs!r:.100}")
    refs = [PairRef.from_json(p, f"pair {i}") for i, p in enumerate(pairs)]
    read: dict[str, list[MaskRecord]] = {}

    def documents(key: str) -> list[MaskRecord]:
        if key not in read:
            read[key] = read_grid_masks(store, key)
        return read[key]

    checked = [PhrasePair(r.phrase, r.masks(documents, f"pair {i} ({r.phrase!r})"), r.is_negative)
               for i, r in enumerate(refs)]
    if grid_masks_key is not None:
        if not isinstance(grid_masks_key, str) or not grid_masks_key:
            raise InvalidInput(f"grid_masks_key must be an object key, got {grid_masks_key!r:.100}")
        return checked, documents(grid_masks_key)
    return checked, union_of_masks(checked)


def register_tasks(app: Celery, core_factory: Callable[[], VerifierCore], max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register ``verifier.verify`` on ``app``; ``core_factory`` gives the process's core."""

    def verify(image_key: str, pairs: list[dict], checks: list[str] | None = None,
               grid_masks_key: str | None = None) -> dict:
        """image_key: the image's object key. pairs: ``PairRef`` objects as JSON. checks: a subset
        of "mask", "exhaustivity", "hard_negative" (None or []: all). grid_masks_key: the image's
        class-agnostic masks (SA-1B JSON; None: the union of the pairs' masks). Outputs: the
        verification, ``{"pairs": [{"phrase", "verdicts", "score"}], "score"}``, scores in [0, 1]."""
        if not isinstance(image_key, str) or not image_key:
            raise InvalidInput(f"image_key must be an object key, got {image_key!r:.100}")
        checks = [] if checks is None else checks
        if not isinstance(checks, list) or not all(isinstance(c, str) for c in checks):
            raise InvalidInput(f"checks must be a list of check names, got {checks!r:.100}")
        core = core_factory()
        if core.store is None:
            raise FailedPrecondition("this verifier core has no object store to read keys from")
        phrase_pairs, grid = read_pairs(core.store, pairs, grid_masks_key)
        return core.verify(phrase_pairs, grid, checks, image=image_key).to_json()

    register_core_task(app, TASK_NAME, verify, max_attempts)
