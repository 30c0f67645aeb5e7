"""Decode untrusted image bytes into the HWC uint8 RGB array SAM expects, or raise
``InvalidInput`` naming what was wrong (empty, truncated, not an image, too many pixels)."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidInput
from services.common.keys import sha256_hex


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the encoder.

    pixels: HxWx3 uint8 RGB, EXIF orientation applied.
    image_id: sha256 (hex) of the encoded bytes, the image's identity in the store.
    """

    pixels: np.ndarray
    image_id: str

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def _open(data: bytes, max_pixels: int, name: str) -> Image.Image:
    """The image's header read and checked (empty, unknown format, no pixels, over max_pixels)."""
    if not data:
        raise InvalidInput(f"{name} is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidInput(f"{name} is not a recognised image format ({len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInput(f"{name} is a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises assorted errors on corrupt headers
        raise InvalidInput(f"{name} has a corrupt header: {exc}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InvalidInput(f"{name} has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidInput(
            f"{name} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} "
            "(decompression-bomb guard; raise DATAENGINE_MAX_IMAGE_PIXELS to allow it)")
    return img


# EXIF orientations that turn the image by 90 degrees (transpose, rotate 270, transverse, rotate 90)
_SWAPS_AXES = {5, 6, 7, 8}


def image_size(data: bytes, max_pixels: int, name: str = "image") -> tuple[int, int]:
    """(H, W) in pixels of the image ``decode_image`` would give (EXIF orientation applied), from
    the header alone: no pixel is decoded. ``InvalidInput`` as ``decode_image`` for a bad header."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels, name)
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # a corrupt EXIF block: decode_image would ignore it as exif_transpose does
            orientation = None
    return (w, h) if orientation in _SWAPS_AXES else (h, w)


def decode_image(data: bytes, max_pixels: int, name: str = "image") -> DecodedImage:
    """Decode ``data`` (any format Pillow reads) to RGB, checking it on the way.

    ``max_pixels`` guards against decompression bombs: the header's W*H is checked before any
    pixel is decoded, and Pillow's own bomb warning is raised as an error.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, max_pixels, name)
        try:
            img.load()
            img = ImageOps.exif_transpose(img)  # orientation applied before embedding
            pixels = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidInput(f"{name} is a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInput(f"{name} is truncated or corrupt: {exc}") from None
    return DecodedImage(pixels=pixels, image_id=sha256_hex(data))


def _to_rgb(img: Image.Image) -> np.ndarray:
    """HxWx3 uint8 from any Pillow mode; high bit depths are scaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        else:  # 16-bit samples (Pillow may hand them over as mode "I")
            arr = np.clip(arr, 0, 65535) / 257.0
        gray = np.nan_to_num(arr).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode != "RGB":
        # CMYK, YCbCr, LAB go through Pillow's conversions; alpha is dropped (SAM sees colour only).
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "PA", "LA") else img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
