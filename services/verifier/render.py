"""What a multimodal verifier is shown: the image with masks drawn over it, beside a crop.

A model judges a mask better when it sees both the context (the whole image, the mask tinted and
outlined) and the detail (a crop around the mask at a larger scale), as SAM 3's verifiers do. Both
go into one picture, side by side, so every backend (a local model or an endpoint) takes the same
single image.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from services.common.errors import InvalidInput
from services.common.masks import MaskRecord

TINT = np.array([255, 40, 40], dtype=np.float32)  # RGB of the overlay; a colour rare in photos
ALPHA = 0.45  # overlay opacity
PANEL = 448  # pixels: height of each panel of the composite (a common MLLM tile size)
MARGIN = 0.25  # crop margin around the mask's box, as a fraction of the box's size


def mask_array(mask: MaskRecord, size: tuple[int, int], what: str) -> np.ndarray:
    """HxW bool of ``mask``; ``InvalidInput`` when its size is not the image's ``size`` (H, W)."""
    got = tuple(int(v) for v in mask.segmentation.get("size", ()))
    if got != tuple(size):
        raise InvalidInput(f"{what} is {got[0] if got else '?'}x{got[1] if len(got) > 1 else '?'} but the image "
                           f"is {size[0]}x{size[1]} (H x W): the mask belongs to another image")
    return mask.decode().astype(bool)


def overlay(pixels: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """HxWx3 uint8: ``pixels`` with every mask tinted and outlined."""
    out = pixels.astype(np.float32)
    union = np.zeros(pixels.shape[:2], dtype=bool)
    for m in masks:
        union |= m
    out[union] = (1 - ALPHA) * out[union] + ALPHA * TINT
    out = out.astype(np.uint8)
    thickness = max(1, round(max(pixels.shape[:2]) / 300))
    for m in masks:
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in TINT), thickness)
    return out


def crop_box(masks: Sequence[np.ndarray], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """XYXY pixels around the union of ``masks`` plus ``MARGIN``; the whole image if they are empty."""
    h, w = size
    ys, xs = np.nonzero(np.any(np.stack(masks), axis=0)) if len(masks) else (np.array([]), np.array([]))
    if len(xs) == 0:
        return 0, 0, w, h
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = max(4, int(MARGIN * (x1 - x0))), max(4, int(MARGIN * (y1 - y0)))
    return max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)


def _panel(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    scale = PANEL / h
    return cv2.resize(image, (max(1, round(w * scale)), PANEL),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def composite(pixels: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """PANEL x W' x 3 uint8: the overlaid image, a white gap, and the overlaid crop around the masks.

    pixels: HxWx3 uint8 RGB. masks: HxW bool each (may be empty: the image alone, twice).
    """
    drawn = overlay(pixels, masks)
    x0, y0, x1, y1 = crop_box(masks, pixels.shape[:2])
    gap = np.full((PANEL, 8, 3), 255, dtype=np.uint8)
    return np.concatenate([_panel(drawn), gap, _panel(drawn[y0:y1, x0:x1])], axis=1)
