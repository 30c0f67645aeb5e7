"""decode_image on untrusted bytes: bad input is InvalidInput naming the problem; every Pillow
mode comes out as HxWx3 uint8 RGB, with EXIF orientation applied."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.images import decode_image, image_size
from services.common.keys import sha256_hex
from tests.common.image_cases import BAD_IMAGES, encode, png, rgb_array

LIMIT = 89_478_485  # the settings default (Pillow's own bomb limit)


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_bytes_are_invalid_input_naming_the_problem(name):
    data, phrase = BAD_IMAGES[name]
    with pytest.raises(InvalidInput, match=phrase) as err:
        decode_image(data, LIMIT, name="upload.png")
    assert "upload.png" in str(err.value)  # the message says which image


def test_image_over_max_pixels_is_rejected_before_decoding():
    with pytest.raises(InvalidInput, match=r"40x24 = 960 pixels, over the limit of 959"):
        decode_image(png(24, 40), max_pixels=959)
    assert decode_image(png(24, 40), max_pixels=960).size == (24, 40)  # the limit itself is allowed


def test_one_pixel_image():
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30))), LIMIT)
    assert out.pixels.shape == (1, 1, 3) and out.pixels.tolist() == [[[10, 20, 30]]]


def test_very_large_image_within_the_limit_decodes():
    data = encode(Image.new("RGB", (8000, 6000), (7, 8, 9)), "JPEG", quality=90)
    out = decode_image(data, LIMIT)
    assert out.pixels.shape == (6000, 8000, 3) and out.pixels.dtype == np.uint8
    lo, hi = out.pixels.min(axis=(0, 1)).astype(int), out.pixels.max(axis=(0, 1)).astype(int)
    assert (np.abs(lo - [7, 8, 9]) <= 2).all() and (np.abs(hi - [7, 8, 9]) <= 2).all()  # JPEG rounding only


def _gradient(h=16, w=24) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) % 256).astype(np.uint8)


# mode name -> (encoded bytes, expected HxWx3 pixels, tolerance in grey levels)
_GRAY = _gradient()
_RGB = rgb_array(16, 24, seed=3)
_RGBA = np.dstack([_RGB, np.full((16, 24), 77, np.uint8)])
_PALETTE = Image.fromarray(_RGB).quantize(colors=16)
_CMYK = Image.new("CMYK", (24, 16), (0, 255, 255, 0))  # pure red ink
_I16 = (np.arange(16 * 24).reshape(16, 24) * 170).astype(np.uint16)  # 0..65110: beyond 8 bits
MODES = {
    "L": (encode(Image.fromarray(_GRAY)), np.repeat(_GRAY[:, :, None], 3, axis=2), 0),
    "RGBA (alpha dropped)": (encode(Image.fromarray(_RGBA)), _RGB, 0),
    "P (palette)": (encode(_PALETTE), np.asarray(_PALETTE.convert("RGB")), 0),
    "CMYK JPEG": (encode(_CMYK, "JPEG", quality=95), np.full((16, 24, 3), [255, 0, 0]), 3),
    # 16-bit samples are scaled to 8 bits (65535 -> 255), not clipped at 255.
    "I;16 PNG": (encode(Image.fromarray(_I16)),
                 np.repeat(np.round(_I16 / 257.0)[:, :, None], 3, axis=2), 0),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_comes_out_rgb_uint8(mode):
    data, expected, tol = MODES[mode]
    out = decode_image(data, LIMIT)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == expected.shape
    assert np.abs(out.pixels.astype(int) - expected.astype(int)).max() <= tol
    assert out.image_id == sha256_hex(data)


def test_sixteen_bit_png_uses_the_full_range():
    out = decode_image(MODES["I;16 PNG"][0], LIMIT)
    assert out.pixels.max() > 250  # clipping at 255 would have saturated most of the image
    assert (out.pixels == 255).mean() < 0.05


@pytest.mark.parametrize("orientation, rotate", [
    (1, lambda a: a),                 # upright: unchanged
    (3, lambda a: np.rot90(a, 2)),    # upside down
    (6, lambda a: np.rot90(a, -1)),   # shown rotated 90 degrees clockwise
    (8, lambda a: np.rot90(a, 1)),    # shown rotated 90 degrees counter-clockwise
])
def test_exif_orientation_is_applied(orientation, rotate):
    # Four solid quadrants, so a rotation is unmistakable despite JPEG's loss.
    h, w = 32, 48
    stored = np.zeros((h, w, 3), np.uint8)
    stored[: h // 2, : w // 2] = (255, 0, 0)
    stored[: h // 2, w // 2:] = (0, 255, 0)
    stored[h // 2:, : w // 2] = (0, 0, 255)
    stored[h // 2:, w // 2:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data, LIMIT).pixels
    expected = rotate(stored)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_size_from_the_header_is_the_decoded_size(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(rgb_array(20, 36)), "JPEG", quality=90, exif=exif.tobytes())
    assert image_size(data, LIMIT) == decode_image(data, LIMIT).size == ((36, 20) if orientation >= 5 else (20, 36))


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_image_size_refuses_what_decode_image_refuses_by_its_header(name):
    data, phrase = BAD_IMAGES[name]
    try:
        expected = decode_image(data, LIMIT).size
    except InvalidInput:
        expected = None
    try:
        size = image_size(data, LIMIT)
    except InvalidInput:
        size = None
    # a truncated body passes the header check: the size is known even when the pixels are not
    assert size == expected or (expected is None and size is not None and "truncated" in phrase)
