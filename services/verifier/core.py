"""The verifier core: image–noun-phrase pairs (with their masks) in, a scored ``Verification`` out.
The gRPC servicer, the pipeline step and the embedded runner all call this class.

Backends sit behind one interface, ``VerifierBackend``, in the registry ``BACKENDS``. The offline
default, ``heuristic``, scores from SAM's own quality signals; MLLM backends (which look at the
pixels) plug in behind the same interface.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.images import decode_image
from services.common.masks import MaskRecord
from services.common.settings import Settings
from services.common.storage import ObjectStore, open_store
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.embedder.types import ImageSource

CHECKS = ("mask", "exhaustivity", "hard_negative")
ACCEPT_AT = 0.5  # a verdict's choice is "accept" when its score (P(accept)) is at least this


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
        core (unique phrases, negatives without masks, finite mask scores). grid_masks: the item's
        class-agnostic masks. checks: the subset of ``CHECKS`` to run; a pair whose check is not
        in it is left out of the result."""
        ...


def mask_quality(mask: MaskRecord, what: str) -> float:
    """SAM's own confidence in a mask, in [0, 1]: clip(predicted_iou) * clip(stability_score).

    NaN or infinite scores mean the model that produced the mask broke: ``InvalidInput`` naming ``what``.
    """
    for name in ("predicted_iou", "stability_score"):
        value = getattr(mask, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InvalidInput(f"{what} has {name} {value!r}: not a finite number (a model output error)")
    return min(max(float(mask.predicted_iou), 0.0), 1.0) * min(max(float(mask.stability_score), 0.0), 1.0)


class HeuristicVerifier:
    """Offline: scores pairs from SAM's predicted IoU and stability; it never looks at the image.

    - a pair with masks: one "mask" verdict per mask (score = ``mask_quality``); the pair scores
      the mean. This says the masks are clean, not that they show the phrase.
    - an ungrounded label (no masks, positive): one "exhaustivity" verdict scored with the grid
      quality, the mean of the ``top_k`` best grid-mask qualities (0.0 without grid masks).
    - a hard negative: it cannot verify absence without seeing the image, so it abstains: one
      "hard_negative" verdict with choice "review" and score ``negative_score`` (a neutral prior,
      not an observation; routing decides whether a human looks).
    The item scores the minimum over its positive pairs (the weakest phrase decides), or the
    grid quality when it has no positive pair.
    """

    name = "heuristic"
    needs_pixels = False

    def __init__(self, top_k: int = 5, negative_score: float = 0.5) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= negative_score <= 1.0:  # also rejects NaN
            raise ValueError(f"negative_score must be in [0, 1], got {negative_score}")
        self.top_k = top_k
        self.negative_score = float(negative_score)

    def grid_quality(self, grid_masks: Sequence[MaskRecord]) -> float:
        """Mean ``mask_quality`` of the ``top_k`` best grid masks; 0.0 if there are none."""
        scores = sorted((mask_quality(m, f"grid mask {i}") for i, m in enumerate(grid_masks)), reverse=True)
        best = scores[:self.top_k]
        return sum(best) / len(best) if best else 0.0

    def verify(self, pixels: np.ndarray | None, pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord],
               checks: frozenset[str] = frozenset(CHECKS)) -> Verification:
        grid = self.grid_quality(grid_masks)
        results = [self._pair(pair, grid) for pair in pairs if _check_of(pair) in checks]
        positives = [r.score for r in results if not r.is_negative]
        return Verification(pairs=results, score=min(positives) if positives else grid)

    def _pair(self, pair: PhrasePair, grid: float) -> PairVerdict:
        check = _check_of(pair)
        if check == "hard_negative":
            verdicts = [Verdict("hard_negative", "review", self.negative_score, self.name, pair.phrase)]
        elif check == "exhaustivity":
            verdicts = [Verdict("exhaustivity", _choice(grid), grid, self.name, pair.phrase)]
        else:
            verdicts = [Verdict("mask", _choice(q), q, self.name, pair.phrase, [i])
                        for i, m in enumerate(pair.masks)
                        for q in [mask_quality(m, f"pair {pair.phrase!r} mask {i}")]]
        score = sum(v.score for v in verdicts) / len(verdicts)
        return PairVerdict(pair.phrase, pair.is_negative, score, verdicts, mask_count=len(pair.masks))


def _check_of(pair: PhrasePair) -> str:
    """Which check verifies a pair: a negative's absence, a positive's masks, or a label's exhaustivity."""
    return "hard_negative" if pair.is_negative else ("mask" if pair.masks else "exhaustivity")


def _choice(score: float) -> str:
    return "accept" if score >= ACCEPT_AT else "reject"


# name -> factory(settings). Model backends import their heavy libraries inside the factory.
BACKENDS: dict[str, Callable[[Settings], VerifierBackend]] = {"heuristic": lambda settings: HeuristicVerifier()}


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
    a mask score that is not finite."""
    checked, seen = [], {}
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
            mask_quality(mask, f"pair {pair.phrase!r} mask {j}")
        checked.append(PhrasePair(pair.phrase, masks, pair.is_negative))
    for j, mask in enumerate(grid_masks):
        mask_quality(mask, f"grid mask {j}")
    return checked


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
        pixels = self._read(image)
        return self.backend.verify(pixels, checked, list(grid_masks), frozenset(checks or CHECKS))

    def _read(self, image: ImageSource | bytes | str | None) -> np.ndarray | None:
        if image is None:
            if self.backend.needs_pixels:
                raise InvalidInput(f"verifier backend {self.backend.name!r} needs the image")
            return None
        source = ImageSource.of(image)
        name = source.describe(0)
        if source.key is not None and self.store is None:
            raise FailedPrecondition(f"{name}: this verifier core has no object store to read keys from")
        if not self.backend.needs_pixels:
            if source.key is not None and not self.store.exists(source.key):
                raise NotFound(f"{name} not found in the object store")
            return None
        data = source.data if source.data is not None else self.store.get(source.key)
        return decode_image(data, self.max_pixels, name=name).pixels
