"""Routing by verifier score (ARCHITECTURE.md, stage 3).

With thresholds ``accept`` (default 0.9) and ``review`` (default 0.7), a score ``s`` goes to:

    s >= accept            -> ACCEPTED  (into the dataset)
    review <= s < accept   -> REVIEW    (active mining: a human verifies)
    s < review             -> REJECTED  (the stage-2 human fix queue)

Both boundaries belong to the higher bucket: exactly 0.9 is accepted, exactly 0.7 is reviewed.
Stage-2 (semi-automatic) items are never accepted without a human: what would be accepted is
reviewed. A NaN or out-of-range score is a model-output error, not a routing decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.errors import InvalidInput
from services.orchestrator.model import ItemState, Stage


@dataclass(frozen=True)
class Thresholds:
    accept: float = 0.9
    review: float = 0.7

    def __post_init__(self) -> None:
        if not (0.0 <= self.review <= self.accept <= 1.0):
            raise ValueError(f"thresholds need 0 <= review ({self.review}) <= accept ({self.accept}) <= 1")

    def route(self, score: float, stage: Stage = Stage.FULLY_AUTOMATIC) -> ItemState:
        """The state an item (or a phrase) with verifier ``score`` goes to."""
        if not isinstance(score, (int, float)) or math.isnan(score) or not 0.0 <= score <= 1.0:
            raise InvalidInput(f"verifier score must be a number in [0, 1], got {score!r}")
        if score >= self.accept:
            state = ItemState.ACCEPTED
        elif score >= self.review:
            state = ItemState.REVIEW
        else:
            state = ItemState.REJECTED
        if stage == Stage.SEMI_AUTOMATIC and state == ItemState.ACCEPTED:
            return ItemState.REVIEW
        return state
