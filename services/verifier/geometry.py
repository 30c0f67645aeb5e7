"""Shape features of one mask, from its COCO RLE: what the ``heuristic`` verifier reads besides
SAM's own quality signals.

- ``area_fraction``: mask pixels / image pixels, in [0, 1].
- ``fragments``: 8-connected foreground components (0 for an empty mask, 1 for one solid blob).
- ``holes``: background regions the mask encloses: 4-connected background components that do not
  reach the image border. (Foreground 8- and background 4-connectivity are the dual pair, so a
  diagonal gap in an outline neither splits the outline nor opens its hole.)
- ``border_fraction``: fraction of the image's outer frame (its 2(H+W)-4 edge pixels, every pixel
  when H or W is at most 2) that the mask covers, in [0, 1]: 1 for a whole-image mask, small for
  an object that only touches an edge.

Counts are computed on the mask's bounding box padded by one background pixel: every background
region that reaches the bbox's outside reaches the image border, so nothing is lost and a small
mask on a large image costs little.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from services.common.errors import InvalidInput
from services.common.masks import decode_rle


@dataclass(frozen=True)
class MaskGeometry:
    """Shape features of one full-image mask (see the module docstring for the definitions).

    area_fraction, border_fraction: in [0, 1]. fragments, holes: counts. size: (H, W) pixels.
    """

    area_fraction: float
    fragments: int
    holes: int
    border_fraction: float
    size: tuple[int, int]


def rle_size(rle: object, what: str = "mask") -> tuple[int, int]:
    """(H, W) of a COCO RLE, or ``InvalidInput`` naming ``what`` if it is not two positive ints."""
    size = rle.get("size") if isinstance(rle, dict) else None
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise InvalidInput(f"{what} segmentation needs 'size' [H, W] of positive ints, got {size!r:.60}")
    return int(size[0]), int(size[1])


def checked_decode(rle: object, what: str = "mask") -> np.ndarray:
    """HxW bool of a COCO RLE (compressed or not), or ``InvalidInput`` naming ``what``.

    The runs must be non-negative and cover exactly H*W pixels: pycocotools decodes runs that fall
    short into uninitialised memory (a different mask on every call) instead of failing.
    """
    rle_size(rle, what)
    try:
        return decode_rle(rle)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise InvalidInput(f"{what} has a malformed RLE: {exc}") from None


def _border_fraction(mask: np.ndarray) -> float:
    h, w = mask.shape
    if h <= 2 or w <= 2:  # every pixel is on the frame
        return float(mask.mean())
    covered = mask[0].sum() + mask[-1].sum() + mask[1:-1, 0].sum() + mask[1:-1, -1].sum()
    return float(covered) / (2 * w + 2 * (h - 2))


def geometry_of(mask: np.ndarray) -> MaskGeometry:
    """Features of an HxW bool (or 0/1) mask."""
    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return MaskGeometry(0.0, 0, 0, 0.0, (h, w))
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    padded = np.pad(box, 1).astype(np.uint8)
    fragments = cv2.connectedComponents(padded, connectivity=8)[0] - 1  # label 0 is the background
    # Inverted, label 0 is the mask; of the background components one is the padding ring (and all
    # that reaches it); the others are enclosed.
    holes = cv2.connectedComponents(1 - padded, connectivity=4)[0] - 2
    return MaskGeometry(float(mask.sum()) / (h * w), int(fragments), int(holes), _border_fraction(mask), (h, w))


def mask_geometry(rle: object, what: str = "mask") -> MaskGeometry:
    """Features of the mask a COCO RLE encodes; a malformed RLE is ``InvalidInput`` naming ``what``."""
    return geometry_of(checked_decode(rle, what))
