"""The offline ``heuristic`` verifier backend: it never looks at the image and scores each mask
from SAM's own signals and the mask's shape (``geometry``). Formula version 2 (``FORMULA_VERSION``),
for a mask of an HxW image:

    q      = clip(predicted_iou, 0, 1) * clip(stability_score, 0, 1)        SAM's own confidence
    g_area = min(1, a / 1e-4) * min(1, (1 - a) / (1 - 0.9))                  a = area fraction
    g_frag = 1 / (1 + 0.2 * (fragments - 1))                                 one blob: 1
    g_hole = 1 / (1 + 0.1 * holes)                                           no hole: 1
    g_edge = 1 - 0.5 * border_fraction                                       off the frame: 1
    raw    = q * g_area * g_frag * g_hole * g_edge                           in [0, 1]

An empty mask (a = 0) and a whole-image mask (a = 1) score 0; a mask covering more than 90% of the
image is falling fast and its verdict's choice is "whole_image"; a speckled mask (many fragments,
or a lattice of holes) scores near 0. Holes and fragments are mild penalties because real objects
have them (a ring, an occluded car in two pieces); speckle has dozens.

Aggregation (raw, i.e. uncalibrated):
- a pair with masks: one "mask" verdict per mask (score ``raw``, choice "accept" at >= 0.5, else
  "reject", or "whole_image"); the pair scores the mean of its mask verdicts. This says the masks
  are clean, not that they show the phrase: the heuristic never chooses "accept_as_text" or
  "flag_label", which are judgements about the phrase.
- an ungrounded label (a positive without masks): one "exhaustivity" verdict scored with the grid
  quality, the mean ``raw`` of the ``top_k`` best grid masks; "ungroundable" with score 0 when the
  item has no grid masks.
- a hard negative: absence cannot be checked without the image, so it abstains: one
  "hard_negative" verdict with choice "review" and score ``negative_score`` (a neutral prior, not
  an observation; it does not enter the item score).
- the item: the minimum over its positive pairs (the weakest phrase decides), or the grid quality
  when it has none.

Calibrated (``settings.verifier_calibration``, fit by ``dataengine calibrate``): every scored unit
has a feature vector (``FEATURES``): a mask its own, a pair or the grid the mean over its masks
with ``raw_logit`` the logit of the unit's raw score. Each score is then the calibration's
probability that a human accepts, applied to that unit's features with the model of its check
(``calibration.MODEL_CHECKS``; a file without that model falls back, ``calibration.FALLBACK``):
mask verdicts the "mask" model on their mask's features; exhaustivity verdicts the "exhaustivity"
model on the grid's; pair scores (a pair's masks, or the grid for an ungrounded label) and the
grid-quality item score the "item" model; the item is still the minimum over its positive pairs.
A score fixed by rule (ungroundable 0, the hard-negative prior) is not calibrated.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from services.common.masks import MaskRecord
from services.common.settings import Settings
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.verifier.core import CHECKS, PhrasePair, signal
from services.verifier.geometry import MaskGeometry, mask_geometry

ACCEPT_AT = 0.5  # a verdict's choice is "accept" when its score (P(accept)) is at least this
FORMULA_VERSION = 2  # version 1 was q alone; a calibration fit on another version is refused
AREA_LOW = 1e-4  # area fractions below this ramp to 0: ~100 pixels of a 1 MP image, a speck
AREA_HIGH = 0.9  # above this the score ramps to 0 at the whole image, and the choice is "whole_image"
FRAGMENT_WEIGHT = 0.2  # each fragment beyond the first: 2 fragments 0.83, 6 fragments 0.5, 50 fragments 0.09
HOLE_WEIGHT = 0.1  # each hole: 1 hole 0.91, 10 holes 0.5
BORDER_WEIGHT = 0.5  # a mask covering the image's whole frame keeps half its score (if its area let it)
LOGIT_EPS = 1e-4  # raw scores are clipped to [eps, 1 - eps] before the logit: raw_logit in [-9.2, 9.2]

# The feature vector of a scored unit (what a calibration is fit on), in this order. Fragments and
# holes are log1p counts: the tenth fragment says less than the second.
FEATURES = ("raw_logit", "predicted_iou", "stability_score", "area_fraction", "log1p_fragments", "log1p_holes",
            "border_fraction")



def geometry_factor(geometry: MaskGeometry) -> float:
    """g_area * g_frag * g_hole * g_edge of the module docstring, in [0, 1]."""
    a = geometry.area_fraction
    g_area = min(1.0, a / AREA_LOW) * min(1.0, (1.0 - a) / (1.0 - AREA_HIGH))
    g_frag = 1.0 / (1.0 + FRAGMENT_WEIGHT * max(geometry.fragments - 1, 0))
    g_hole = 1.0 / (1.0 + HOLE_WEIGHT * geometry.holes)
    g_edge = 1.0 - BORDER_WEIGHT * geometry.border_fraction
    return max(g_area, 0.0) * g_frag * g_hole * g_edge


def logit(p: float) -> float:
    p = min(max(p, LOGIT_EPS), 1.0 - LOGIT_EPS)
    return math.log(p / (1.0 - p))


class Evidence(NamedTuple):
    """A scored unit (a mask, a pair's masks, the best grid masks): its raw score in [0, 1] and its
    feature vector, shape (len(FEATURES),) float64."""

    raw: float
    features: np.ndarray


class MaskEvidence(NamedTuple):
    """What the heuristic reads from one mask: SAM's scores clipped to [0, 1], its geometry, and raw."""

    iou: float
    stability: float
    geometry: MaskGeometry
    raw: float

    @classmethod
    def of(cls, mask: MaskRecord, what: str) -> "MaskEvidence":
        iou, stability = signal(mask, "predicted_iou", what), signal(mask, "stability_score", what)
        geometry = mask_geometry(mask.segmentation, what)
        return cls(iou, stability, geometry, iou * stability * geometry_factor(geometry))

    def evidence(self) -> Evidence:
        g = self.geometry
        return Evidence(self.raw, np.array([logit(self.raw), self.iou, self.stability, g.area_fraction,
                                            math.log1p(g.fragments), math.log1p(g.holes), g.border_fraction]))


def summarize(masks: Sequence[MaskEvidence]) -> Evidence:
    """A group of masks as one unit: raw the mean raw, features the mean features but for
    ``raw_logit``, which is the logit of that mean (so it is the unit's own raw score)."""
    raw = sum(m.raw for m in masks) / len(masks)
    features = np.mean([m.evidence().features for m in masks], axis=0)
    features[0] = logit(raw)
    return Evidence(raw, features)


class Calibrator(Protocol):
    def probability(self, features: np.ndarray, check: str) -> float:
        """P(a human accepts) of a unit with ``features`` (shape (len(FEATURES),)), in [0, 1], for
        ``check``: "item" (pair and item scores), "mask" (a mask verdict) or "exhaustivity"."""
        ...


class HeuristicVerifier:
    """Offline: scores pairs by the module docstring's formula and aggregation; it never looks at
    the image. calibration: maps features to probabilities (None: scores are the raw formula)."""

    name = "heuristic"
    needs_pixels = False

    def __init__(self, top_k: int = 5, negative_score: float = 0.5, calibration: Calibrator | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= negative_score <= 1.0:  # also rejects NaN
            raise ValueError(f"negative_score must be in [0, 1], got {negative_score}")
        self.top_k = top_k
        self.negative_score = float(negative_score)
        self.calibration = calibration
        # Verdicts say which scores they carry: raw and calibrated scores are not comparable.
        self.source = self.name if calibration is None else f"{self.name}+calibration"

    @classmethod
    def from_settings(cls, settings: Settings) -> "HeuristicVerifier":
        """Calibrated when ``settings.verifier_calibration`` names a file (``FailedPrecondition`` if
        it is missing or malformed)."""
        if settings.verifier_calibration is None:
            return cls()
        from services.verifier.calibration import CalibrationFile

        return cls(calibration=CalibrationFile.load(settings.verifier_calibration))

    def score(self, unit: Evidence, check: str = "item") -> float:
        """The unit's score: its calibrated probability for ``check`` ("item": a pair or item
        score, "mask", "exhaustivity": a verdict), or its raw score without a calibration."""
        return unit.raw if self.calibration is None else self.calibration.probability(unit.features, check)

    def grid_evidence(self, grid_masks: Sequence[MaskRecord]) -> Evidence | None:
        """The ``top_k`` best grid masks (by raw) as one unit; None without grid masks."""
        masks = sorted((MaskEvidence.of(m, f"grid mask {i}") for i, m in enumerate(grid_masks)),
                       key=lambda m: m.raw, reverse=True)
        return summarize(masks[:self.top_k]) if masks else None

    def item_features(self, pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord]) -> np.ndarray | None:
        """Features of the unit that sets the raw item score: the positive pair with the lowest raw
        score (its masks, or the grid for an ungrounded label), or the grid without positive pairs.
        None when that unit is scored by rule (an ungroundable label, no grid). Pairs as ``check_pairs``
        returns them. This is one training example of a calibration."""
        grid = functools.cache(lambda: self.grid_evidence(grid_masks))
        units = [self._masks(p)[1] if p.masks else grid() for p in pairs if not p.is_negative] or [grid()]
        if any(u is None for u in units):
            return None
        return min(units, key=lambda u: u.raw).features

    def verify(self, pixels: np.ndarray | None, pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord],
               checks: frozenset[str] = frozenset(CHECKS)) -> Verification:
        # The grid is decoded only when a label or the item score needs it: it may hold 100+ masks.
        grid = functools.cache(lambda: self.grid_evidence(grid_masks))
        results = [self._pair(pair, grid) for pair in pairs if _check_of(pair) in checks]
        positives = [r.score for r in results if not r.is_negative]
        if positives:
            return Verification(pairs=results, score=min(positives))
        return Verification(pairs=results, score=self.score(grid()) if grid() is not None else 0.0)

    def _masks(self, pair: PhrasePair) -> tuple[list[MaskEvidence], Evidence]:
        masks = [MaskEvidence.of(m, f"pair {pair.phrase!r} mask {i}") for i, m in enumerate(pair.masks)]
        return masks, summarize(masks)

    def _pair(self, pair: PhrasePair, grid: Callable[[], Evidence | None]) -> PairVerdict:
        check = _check_of(pair)
        if check == "hard_negative":
            score = self.negative_score
            verdicts = [Verdict("hard_negative", "review", score, self.source, pair.phrase)]
        elif check == "exhaustivity":
            unit = grid()
            score = self.score(unit) if unit is not None else 0.0
            exhaustive = self.score(unit, "exhaustivity") if unit is not None else 0.0
            choice = _choice(exhaustive) if unit is not None else "ungroundable"
            verdicts = [Verdict("exhaustivity", choice, exhaustive, self.source, pair.phrase)]
        else:
            masks, unit = self._masks(pair)
            verdicts = []
            for i, mask in enumerate(masks):
                s = self.score(mask.evidence(), "mask")
                choice = "whole_image" if mask.geometry.area_fraction > AREA_HIGH else _choice(s)
                verdicts.append(Verdict("mask", choice, s, self.source, pair.phrase, [i]))
            score = self.score(unit)  # raw: the mean of the mask verdicts
        return PairVerdict(pair.phrase, pair.is_negative, score, verdicts, mask_count=len(pair.masks))


def _check_of(pair: PhrasePair) -> str:
    """Which check verifies a pair: a negative's absence, a positive's masks, or a label's exhaustivity."""
    return "hard_negative" if pair.is_negative else ("mask" if pair.masks else "exhaustivity")


def _choice(score: float) -> str:
    return "accept" if score >= ACCEPT_AT else "reject"
