"""Active mining's vocabulary: why an item needs a human, and how much each reason weighs in the
review queue. Shared by the orchestrator (which assigns the modes and orders the queue by them),
the settings (which check the weights) and the studio (which shows them).

The failure modes, each from the verifier's verdicts or from the data:

- ``low_mask_quality``: a mask verdict of a positive phrase scores below ``low_mask_score``.
- ``exhaustivity_doubt``: an exhaustivity verdict scores below ``exhaustive_score`` or did not
  choose "accept" (some instances may be missing).
- ``hard_negative_present``: a hard negative's verdict says "present", or P(absent) is below
  ``negative_present_score``: the phrase we call absent may be in the image.
- ``ungroundable_phrase``: a positive phrase has no masks (no backend could ground it), or its
  exhaustivity verdict chose "ungroundable".
- ``crowded_scene``: at least ``crowded_instances`` instance masks over the positive phrases, or at
  least ``crowded_grid_masks`` automatic grid masks.
- ``small_objects``: an instance mask covers less than ``small_area_fraction`` of the image
  (0.001: COCO's "small", 32x32 px, on a 1024-px image).
- ``rare_phrase``: a positive phrase fewer than ``rare_phrase_items`` items of the store carry
  (this one included), when the item is routed.

Priority (the review queue's order inside a band, most urgent first): the urgency of an item is

    u = (w_score * (1 - score) + sum of w_m over its modes m) / (w_score + sum of all w_m)

in [0, 1], and its rank in the band is ``1 - u``. With every mode weight 0 this is the plain
"lowest verifier score first"; the default weights put the long tail (rare phrases) and likely
false negatives (a hard negative present) first, as SAM 3's engine spends human time where the
model fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.errors import InvalidInput

FAILURE_MODES = ("low_mask_quality", "exhaustivity_doubt", "hard_negative_present", "ungroundable_phrase",
                 "crowded_scene", "small_objects", "rare_phrase")
# "score": the weight of the verifier's doubt (1 - score); every other key is a failure mode.
DEFAULT_WEIGHTS = {"score": 1.0, "low_mask_quality": 1.0, "exhaustivity_doubt": 0.5, "hard_negative_present": 1.0,
                   "ungroundable_phrase": 0.5, "crowded_scene": 0.25, "small_objects": 0.5, "rare_phrase": 1.0}


def check_weights(weights: dict) -> dict[str, float]:
    """DEFAULT_WEIGHTS updated by ``weights``; InvalidInput names an unknown key or a weight that is
    not a finite number >= 0."""
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise InvalidInput(f"unknown mining weight {', '.join(map(repr, unknown))}: the keys are "
                           f"{', '.join(DEFAULT_WEIGHTS)}")
    out = dict(DEFAULT_WEIGHTS)
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"mining weight {key!r} must be a finite number >= 0, got {value!r:.60}")
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class MiningPolicy:
    """The bars of the failure modes (see the module docstring) and the queue weights."""

    low_mask_score: float = 0.7
    exhaustive_score: float = 0.9
    negative_present_score: float = 0.5
    crowded_instances: int = 20
    crowded_grid_masks: int = 100
    small_area_fraction: float = 0.001
    rare_phrase_items: int = 3
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", check_weights(self.weights))

    @classmethod
    def from_settings(cls, settings) -> "MiningPolicy":
        return cls(settings.mining_low_mask_score, settings.mining_exhaustive_score,
                   settings.mining_negative_present_score, settings.mining_crowded_instances,
                   settings.mining_crowded_grid_masks, settings.mining_small_area_fraction,
                   settings.mining_rare_phrase_items, dict(settings.mining_weights))

    def urgency(self, score: float, modes: list[str]) -> float:
        """u in [0, 1] of an item with verifier ``score`` and failure ``modes`` (higher: sooner)."""
        w = self.weights
        total = sum(w.values())
        if total <= 0:
            return 0.0
        doubt = 1.0 - min(1.0, max(0.0, score))
        return (w["score"] * doubt + sum(w[m] for m in set(modes) if m in w)) / total


@dataclass
class MiningRecord:
    """One routing of an item by the verifier: which decoder's masks, when (unix seconds), where it
    went (state name), its failure modes and, per phrase, the phrase's own (``crowded_scene`` is
    the image's: it is in ``modes`` only)."""

    decoder: str
    at: float
    state: str
    modes: list[str] = field(default_factory=list)
    phrases: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"decoder": self.decoder, "at": self.at, "state": self.state, "modes": list(self.modes),
                "phrases": {p: list(m) for p, m in self.phrases.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "MiningRecord":
        return cls(decoder=str(d.get("decoder", "")), at=float(d["at"]), state=str(d["state"]),
                   modes=[str(m) for m in d.get("modes", [])],
                   phrases={str(p): [str(m) for m in ms] for p, ms in dict(d.get("phrases", {})).items()})
