"""Mask geometry of the heuristic verifier: area fraction, fragments, holes and border coverage of
constructed masks, read from their COCO RLE, and malformed RLEs refused by name."""

from __future__ import annotations

import re

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.common.masks import encode_rle
from services.verifier.geometry import MaskGeometry, checked_decode, geometry_of, mask_geometry

H, W = 10, 12  # the frame has 2 * 12 + 2 * 8 = 40 pixels


def _mask(*boxes: tuple[slice, slice], cut: tuple[slice, slice] | None = None) -> np.ndarray:
    """HxW bool: the union of ``boxes`` (row slice, column slice), minus ``cut``."""
    m = np.zeros((H, W), bool)
    for rows, cols in boxes:
        m[rows, cols] = True
    if cut is not None:
        m[cut] = False
    return m


ALL = (slice(None), slice(None))
# mask -> (area_fraction, fragments, holes, border_fraction)
CASES = {
    "empty": (_mask(), (0.0, 0, 0, 0.0)),
    "full": (_mask(ALL), (1.0, 1, 0, 1.0)),
    # two 2x2 squares, apart: 8 of 120 pixels
    "two blobs": (_mask((slice(2, 4), slice(2, 4)), (slice(6, 8), slice(7, 9))), (8 / 120, 2, 0, 0.0)),
    # a 6x6 square with a 2x2 hole: 32 pixels
    "ring with a hole": (_mask((slice(2, 8), slice(3, 9)), cut=(slice(4, 6), slice(5, 7))), (32 / 120, 1, 1, 0.0)),
    # a 3x4 block in the top-left corner: 4 top-row pixels and 2 more in the left column
    "touching the border": (_mask((slice(0, 3), slice(0, 4))), (12 / 120, 1, 0, 6 / 40)),
    # diagonal neighbours are one fragment (8-connectivity) and do not leak the hole (4-connectivity)
    "diagonal ring": (_mask((slice(2, 3), slice(4, 5)), (slice(3, 4), slice(3, 4)), (slice(3, 4), slice(5, 6)),
                            (slice(4, 5), slice(4, 5))), (4 / 120, 1, 1, 0.0)),
    # a U open to the bottom edge encloses nothing: its inside reaches the border
    "U open to the border": (_mask((slice(4, 10), slice(3, 4)), (slice(4, 10), slice(7, 8)),
                                   (slice(4, 5), slice(3, 8))), (15 / 120, 1, 0, 2 / 40)),
    # the image's frame itself: one fragment around one hole
    "frame": (_mask(ALL, cut=(slice(1, -1), slice(1, -1))), (40 / 120, 1, 1, 1.0)),
    # single pixels at rows 0, 3, 6, 9 x columns 1, 4, 7, 10: 16 fragments, 8 of them on the frame
    "speckle": (_mask(*[(slice(r, r + 1), slice(c, c + 1)) for r in (0, 3, 6, 9) for c in (1, 4, 7, 10)]),
                (16 / 120, 16, 0, 8 / 40)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_features_of_constructed_masks(case):
    mask, (area, fragments, holes, border) = CASES[case]
    expected = MaskGeometry(pytest.approx(area), fragments, holes, pytest.approx(border), (H, W))
    assert geometry_of(mask) == expected
    # the same from the RLE, compressed and as the uncompressed run list
    assert mask_geometry(encode_rle(mask)) == expected
    runs = _runs(mask)
    assert mask_geometry({"size": [H, W], "counts": runs}) == expected


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts: alternating 0/1 runs in column-major order, starting with 0s."""
    flat = mask.flatten(order="F").astype(int)
    runs, current, length = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(length)
            current, length = v, 0
        length += 1
    return runs + [length]


def test_thin_images_count_every_pixel_as_frame():
    row = np.zeros((1, 10), bool)
    row[0, :4] = True
    assert geometry_of(row).border_fraction == pytest.approx(0.4)


def test_decoding_round_trips_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(1, 40, size=2)
        mask = rng.random((h, w)) < rng.random()
        assert np.array_equal(checked_decode(encode_rle(mask)), mask)


# segmentation -> a phrase the error must contain
BAD_RLES = {
    "not a dict": ("0", "needs 'size'"),
    "no size": ({"counts": "0"}, "needs 'size'"),
    "zero size": ({"size": [4, 0], "counts": ""}, "needs 'size'"),
    "size as text": ({"size": ["4", "5"], "counts": ""}, "needs 'size'"),
    # pycocotools would decode this into uninitialised memory
    "runs too short": ({"size": [4, 5], "counts": "0"}, "its runs cover 0 pixels, not 4x5 = 20"),
    "runs too long": ({"size": [2, 2], "counts": [3, 4]}, "its runs cover 7 pixels, not 2x2 = 4"),
    "negative run": ({"size": [4, 5], "counts": [-1, 21]}, "some negative"),
    "not an RLE digit": ({"size": [4, 5], "counts": "\x01"}, "is not an RLE digit"),
    "cut off inside a run": ({"size": [4, 5], "counts": "o"}, "ends inside a run"),
    "counts a number": ({"size": [4, 5], "counts": 20}, "counts must be a string or a list of ints"),
}


@pytest.mark.parametrize("case", list(BAD_RLES))
def test_malformed_rles_are_invalid_input_naming_the_mask(case):
    rle, phrase = BAD_RLES[case]
    with pytest.raises(InvalidInput, match=r"^pair 'cat' mask 2 .*" + re.escape(phrase)):
        mask_geometry(rle, "pair 'cat' mask 2")
