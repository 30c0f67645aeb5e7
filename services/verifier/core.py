"""The verifier core: image–noun-phrase pairs (with their masks) in, a scored ``Verification`` out.
The gRPC servicer, the pipeline step and the embedded runner all call this class.

Backends sit behind one interface, ``VerifierBackend``, in the registry ``BACKENDS``: the offline
default ``heuristic`` (``heuristic.py``: SAM's own signals and the mask's shape, never the image)
and the multimodal models ``openai`` and ``transformers`` (``model_backends.py``). Each documents
its scores and how it aggregates them into pair and item scores. The core checks the input the
same way for all of them (``check_pairs``, ``check_image_size``).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.common.images import decode_image, image_size
from services.common.masks import MaskRecord
from services.common.settings import Settings
from services.common.storage import ObjectStore, open_store
from services.common.verdicts import Verification
from services.common.image_source import ImageSource
from services.verifier.geometry import rle_size

CHECKS = ("mask", "exhaustivity", "hard_negative")


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


def signal(mask: MaskRecord, name: str, what: str) -> float:
    """One of SAM's scores clipped to [0, 1]; NaN or infinite means the model that produced the
    mask broke: ``InvalidInput`` naming ``what``."""
    value = getattr(mask, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InvalidInput(f"{what} has {name} {value!r}: not a finite number (a model output error)")
    return min(max(float(value), 0.0), 1.0)


def mask_quality(mask: MaskRecord, what: str) -> float:
    """SAM's own confidence in a mask, in [0, 1]: clip(predicted_iou) * clip(stability_score)."""
    return signal(mask, "predicted_iou", what) * signal(mask, "stability_score", what)


def _heuristic(settings: Settings) -> VerifierBackend:
    from services.verifier.heuristic import HeuristicVerifier

    return HeuristicVerifier.from_settings(settings)


def _uncalibrated(settings: Settings, name: str) -> None:
    """A calibration fits the heuristic's features; silently ignoring it under a model backend
    would route on other scores than the operator set up."""
    if settings.verifier_calibration is not None:
        raise FailedPrecondition(f"DATAENGINE_VERIFIER_CALIBRATION ({settings.verifier_calibration}) calibrates the "
                                 f"heuristic verifier only; the {name} backend's scores are the model's own "
                                 "probabilities: unset it, or use the heuristic backend")


def _openai(settings: Settings) -> VerifierBackend:
    from services.verifier.model_backends import openai_verifier

    _uncalibrated(settings, "openai")
    return openai_verifier(settings)


def _transformers(settings: Settings) -> VerifierBackend:
    from services.verifier.model_backends import transformers_verifier

    _uncalibrated(settings, "transformers")
    return transformers_verifier(settings)


# name -> factory(settings). Model backends import their heavy libraries inside the factory.
BACKENDS: dict[str, Callable[[Settings], VerifierBackend]] = {
    "heuristic": _heuristic, "openai": _openai, "transformers": _transformers}


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


def union_of_masks(pairs: Sequence[PhrasePair]) -> list[MaskRecord]:
    """The image's masks when a request carries no grid of its own: the union of its pairs'
    masks (a mask shared by two phrases counts once, by its RLE)."""
    union: dict[tuple, MaskRecord] = {}
    for pair in pairs:
        for mask in pair.masks:
            union.setdefault((tuple(mask.segmentation["size"]), mask.segmentation["counts"]), mask)
    return list(union.values())


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
        image: needed by backends that read pixels; when given, the masks must have its size
        (``InvalidInput``) and an object key must exist (``NotFound``).
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
        """(pixels if the backend reads them, else None; the image's (H, W), or None without an image).
        A backend that ignores pixels still has the image read, for its header: masks of another
        size than the image are bad input whoever made them."""
        if image is None:
            if self.backend.needs_pixels:
                raise InvalidInput(f"verifier backend {self.backend.name!r} needs the image")
            return None, None
        source = ImageSource.of(image)
        name = source.describe(0)
        if source.key is not None and self.store is None:
            raise FailedPrecondition(f"{name}: this verifier core has no object store to read keys from")
        data = source.data if source.data is not None else self._get(source.key, name)
        if not self.backend.needs_pixels:  # the header alone gives the size the masks must have
            return None, image_size(data, self.max_pixels, name)
        pixels = decode_image(data, self.max_pixels, name=name).pixels
        return pixels, (int(pixels.shape[0]), int(pixels.shape[1]))


    def _get(self, key: str, name: str) -> bytes:
        try:
            return self.store.get(key)
        except NotFound:
            raise NotFound(f"{name} not found in the object store") from None

def check_image_size(pairs: Sequence[PhrasePair], grid_masks: Sequence[MaskRecord], size: tuple[int, int]) -> None:
    """``InvalidInput`` when the masks (all of one size, ``check_pairs``) are not ``size`` (H, W)."""
    first = next(((m, f"pair {p.phrase!r} mask {j}") for p in pairs for j, m in enumerate(p.masks)), None)
    if first is None and grid_masks:
        first = grid_masks[0], "grid mask 0"
    if first is not None:
        h, w = rle_size(first[0].segmentation, first[1])
        if (h, w) != tuple(size):
            raise InvalidInput(f"{first[1]} is {h}x{w} but the image is {size[0]}x{size[1]} (H x W)")
