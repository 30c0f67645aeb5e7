"""Builders of encoded test images, good and bad (shared by the decode and the gRPC tests)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(h: int = 24, w: int = 40, seed: int = 0) -> bytes:
    return encode(Image.fromarray(rgb_array(h, w, seed)))


def jpeg(h: int = 24, w: int = 40, seed: int = 0) -> bytes:
    return encode(Image.fromarray(rgb_array(h, w, seed)), "JPEG", quality=95)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR then claims ``width`` x ``height`` (CRC fixed): a bomb header."""
    data = bytearray(png(2, 2))
    # IHDR: 8-byte signature, 4-byte length, b"IHDR", then width, height (big-endian uint32).
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF  # type + 13 bytes of IHDR data
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


# name -> (bytes, a phrase the error message must contain)
BAD_IMAGES: dict[str, tuple[bytes, str]] = {
    "zero_bytes": (b"", "empty"),
    "not_an_image": (b"%PDF-1.4 definitely not pixels" * 10, "not a recognised image"),
    "truncated_png": (png(64, 64)[:300], "truncated"),
    "truncated_jpeg": (jpeg(64, 64)[:len(jpeg(64, 64)) // 2], "truncated"),
    "truncated_jpeg_header": (jpeg(64, 64)[:400], "corrupt header"),
    "bomb_header": (png_declaring(100_000, 100_000), "decompression bomb"),
}
