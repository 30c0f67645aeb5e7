"""The verifier core: image–noun-phrase pairs (with their masks) in, a scored ``Verification`` out.
The gRPC servicer, the pipeline step and the embedded runner all call this class.

Backends sit behind one interface, ``VerifierBackend``, in the registry ``BACKENDS``. MLLM backends
(which look at the pixels) live in ``model_backends``; the offline default, ``heuristic``, never
looks at the image and scores each mask from SAM's own signals and the mask's shape
(``geometry``). Formula version 2 (``FORMULA_VERSION``), for a mask of an HxW image:

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
probability that a human accepts, applied to that unit's features: mask verdicts to their mask's,
pairs (and exhaustivity verdicts) to the pair's or the grid's, and the item is still the minimum
over its positive pairs. A score fixed by rule (ungroundable 0, the hard-negative prior) is not
calibrated.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.images import decode_image, image_size
from services.common.masks import MaskRecord
from services.common.settings import Settings
from services.common.storage import ObjectStore, open_store
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.embedder.types import ImageSource
from services.verifier.geometry import MaskGeometry, mask_geometry, rle_size

CHECKS = ("mask", "exhaustivity", "hard_negative")
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


class PhrasePair(NamedTuple):
    """One image–noun-phrase pair: the phrase with all its masks, or a hard negative (no masks).

    A positive without masks is an image-level label nothing grounded.
    """

    phrase: str
    masks: Sequence[MaskRecord] = ()
    is_negative: bool = False


class VerifierBackend(Protocol):
    """A way to verify pairs.

    name: the registry name. needs_pixels: whether ``verify`` looks at the image.
    """

    name: str
    needs_pixels: bool

    def verify(self, pixels: np.ndarray | None, pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord],
               checks: frozenset[str]) -> Verification:
        """pixels: HxWx3 uint8 RGB, or None when ``needs_pixels`` is False. pairs: checked by the
        core (unique phrases, negatives without masks, finite mask scores, one mask size). grid_masks:
        the item's class-agnostic masks. checks: the subset of ``CHECKS`` to run; a pair whose check
        is not in it is left out of the result."""
        ...


def _signal(mask: MaskRecord, name: str, what: str) -> float:
    """One of SAM's scores clipped to [0, 1]; NaN or infinite means the model that produced the
    mask broke: ``InvalidInput`` naming ``what``."""
    value = getattr(mask, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInput(f"{what} has {name} {value!r}: not a finite number (a model output error)")
    return min(max(float(value), 0.0), 1.0)


def mask_quality(mask: MaskRecord, what: str) -> float:
    """SAM's own confidence in a mask, in [0, 1]: clip(predicted_iou) * clip(stability_score)."""
    return _signal(mask, "predicted_iou", what) * _signal(mask, "stability_score", what)


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
        iou, stability = _signal(mask, "predicted_iou", what), _signal(mask, "stability_score", what)
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
    def probability(self, features: np.ndarray) -> float:
        """P(a human accepts) of a unit with ``features`` (shape (len(FEATURES),)), in [0, 1]."""
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
        from services.verifier.calibration import Calibration

        return cls(calibration=Calibration.load(settings.verifier_calibration))

    def score(self, unit: Evidence) -> float:
        """The unit's score: its calibrated probability, or its raw score without a calibration."""
        return unit.raw if self.calibration is None else self.calibration.probability(unit.features)

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
            choice = _choice(score) if unit is not None else "ungroundable"
            verdicts = [Verdict("exhaustivity", choice, score, self.source, pair.phrase)]
        else:
            masks, unit = self._masks(pair)
            verdicts = []
            for i, mask in enumerate(masks):
                s = self.score(mask.evidence())
                choice = "whole_image" if mask.geometry.area_fraction > AREA_HIGH else _choice(s)
                verdicts.append(Verdict("mask", choice, s, self.source, pair.phrase, [i]))
            score = self.score(unit)  # raw: the mean of the mask verdicts
        return PairVerdict(pair.phrase, pair.is_negative, score, verdicts, mask_count=len(pair.masks))


def _check_of(pair: PhrasePair) -> str:
    """Which check verifies a pair: a negative's absence, a positive's masks, or a label's exhaustivity."""
    return "hard_negative" if pair.is_negative else ("mask" if pair.masks else "exhaustivity")


def _choice(score: float) -> str:
    return "accept" if score >= ACCEPT_AT else "reject"


def _openai(settings: Settings) -> VerifierBackend:
    from services.verifier.model_backends import openai_verifier

    return openai_verifier(settings)


def _transformers(settings: Settings) -> VerifierBackend:
    from services.verifier.model_backends import transformers_verifier

    return transformers_verifier(settings)


# name -> factory(settings). Model backends import their heavy libraries inside the factory.
BACKENDS: dict[str, Callable[[Settings], VerifierBackend]] = {
    "heuristic": HeuristicVerifier.from_settings, "openai": _openai, "transformers": _transformers}


def make_backend(name: str, settings: Settings | None = None) -> VerifierBackend:
    """The backend registered as ``name``, configured by ``settings`` (default: the environment's);
    ``InvalidInput`` lists the known ones."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise InvalidInput(f"unknown verifier backend {name!r}; one of {', '.join(sorted(BACKENDS))}")
    return factory(settings if settings is not None else Settings())


def check_pairs(pairs: Sequence[PhrasePair | tuple], grid_masks: Sequence[MaskRecord]) -> list[PhrasePair]:
    """Pairs as ``PhrasePair``s, or ``InvalidInput`` naming the first problem: an empty phrase, a
    phrase given twice (case-insensitively: results are keyed by phrase), a negative with masks,
    a mask score that is not finite, masks of different sizes (they all belong to one image)."""
    checked, seen = [], {}
    sizes = _SizeCheck()
    for i, raw in enumerate(pairs):
        try:
            pair = raw if isinstance(raw, PhrasePair) else PhrasePair(*raw)
        except TypeError:
            raise InvalidInput(f"pair {i} must be (phrase, masks, is_negative), got {raw!r:.100}") from None
        if not isinstance(pair.phrase, str) or not pair.phrase.strip():
            raise InvalidInput(f"pair {i} has an empty phrase")
        if not isinstance(pair.is_negative, bool):
            raise InvalidInput(f"pair {i} ({pair.phrase!r}) is_negative must be a bool, got {pair.is_negative!r}")
        folded = pair.phrase.strip().casefold()
        if folded in seen:
            raise InvalidInput(f"phrase {pair.phrase!r} is given twice (pairs {seen[folded]} and {i})")
        seen[folded] = i
        masks = list(pair.masks or ())
        if pair.is_negative and masks:
            raise InvalidInput(f"pair {i} ({pair.phrase!r}) is a hard negative but has {len(masks)} masks")
        for j, mask in enumerate(masks):
            if not isinstance(mask, MaskRecord):
                raise InvalidInput(f"pair {i} ({pair.phrase!r}) mask {j} is a {type(mask).__name__}, not a mask")
            sizes.check(mask, f"pair {pair.phrase!r} mask {j}")
        checked.append(PhrasePair(pair.phrase, masks, pair.is_negative))
    for j, mask in enumerate(grid_masks):
        sizes.check(mask, f"grid mask {j}")
    return checked


class _SizeCheck:
    """Checks masks one by one: finite scores, and the size of the first mask seen."""

    def __init__(self) -> None:
        self.first: tuple[tuple[int, int], str] | None = None

    def check(self, mask: MaskRecord, what: str) -> None:
        mask_quality(mask, what)
        size = rle_size(mask.segmentation, what)
        if self.first is None:
            self.first = size, what
        elif size != self.first[0]:
            (h, w), other = self.first
            raise InvalidInput(f"{what} is {size[0]}x{size[1]} but {other} is {h}x{w} (H x W): the masks "
                               "of one image must have its size")


class VerifierCore:
    """Pair verification over an object store.

    backend: the backend or its registry name. store: where image keys are looked up (may be None
    when no image key is given). max_pixels: decode limit, for backends that read pixels.
    """

    def __init__(self, backend: VerifierBackend | str = "heuristic", store: ObjectStore | None = None,
                 max_pixels: int = 89_478_485, settings: Settings | None = None) -> None:
        self.backend = make_backend(backend, settings) if isinstance(backend, str) else backend
        self.store = store
        self.max_pixels = max_pixels

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore | None = None) -> "VerifierCore":
        """The core the settings describe (``verifier_backend``), over ``store`` or the settings' store."""
        return cls(settings.verifier_backend, store if store is not None else open_store(settings),
                   settings.max_image_pixels, settings)

    def verify(self, pairs: Sequence[PhrasePair | tuple], grid_masks: Sequence[MaskRecord] = (),
               checks: Sequence[str] = (), image: ImageSource | bytes | str | None = None) -> Verification:
        """Verify ``pairs`` (``PhrasePair``s or ``(phrase, masks, is_negative)`` tuples) of one image.

        grid_masks: the image's class-agnostic masks. checks: subset of ``CHECKS``; empty is all.
        image: needed by backends that read pixels; an object key is checked to exist (``NotFound``).
        """
        unknown = sorted(set(checks) - set(CHECKS))
        if unknown:
            raise InvalidInput(f"unknown checks {unknown}; use {', '.join(CHECKS)} (none: all)")
        checked = check_pairs(pairs, grid_masks)
        pixels, size = self._read(image)
        if size is not None:
            check_image_size(checked, grid_masks, size)
        return self.backend.verify(pixels, checked, list(grid_masks), frozenset(checks or CHECKS))

    def _read(self, image: ImageSource | bytes | str | None) -> tuple[np.ndarray | None, tuple[int, int] | None]:
        """(pixels if the backend reads them, the image's (H, W) where known without a download)."""
        if image is None:
            if self.backend.needs_pixels:
                raise InvalidInput(f"verifier backend {self.backend.name!r} needs the image")
            return None, None
        source = ImageSource.of(image)
        name = source.describe(0)
        if source.key is not None and self.store is None:
            raise FailedPrecondition(f"{name}: this verifier core has no object store to read keys from")
        if not self.backend.needs_pixels:
            if source.data is not None:  # the header alone gives the size the masks must have
                return None, image_size(source.data, self.max_pixels, name)
            if not self.store.exists(source.key):
                raise NotFound(f"{name} not found in the object store")
            return None, None  # not downloaded only to check sizes: the decoder made the masks from it
        data = source.data if source.data is not None else self.store.get(source.key)
        pixels = decode_image(data, self.max_pixels, name=name).pixels
        return pixels, (int(pixels.shape[0]), int(pixels.shape[1]))


def check_image_size(pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord], size: tuple[int, int]) -> None:
    """``InvalidInput`` when the masks (all of one size, ``check_pairs``) are not ``size`` (H, W)."""
    first = next(((m, f"pair {p.phrase!r} mask {j}") for p in pairs for j, m in enumerate(p.masks)), None)
    if first is None and grid_masks:
        first = grid_masks[0], "grid mask 0"
    if first is not None:
        h, w = rle_size(first[0].segmentation, first[1])
        if (h, w) != tuple(size):
            raise InvalidInput(f"{first[1]} is {h}x{w} but the image is {size[0]}x{size[1]} (H x W)")
