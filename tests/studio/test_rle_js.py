"""The page's rle.js against pycocotools: the same counts strings, the same pixels, in real chromium."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from tests.studio.browser import chromium, static_server  # noqa: F401  (fixtures)

JS = """async ([b64, h, w, counts]) => {
  const rle = await import('/static/rle.js');
  const bin = atob(b64);
  const mask = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) mask[i] = bin.charCodeAt(i);
  const enc = rle.encode(mask, h, w);
  const {mask: dec, box} = rle.decodeWithBox({size: [h, w], counts});
  let s = '';
  for (let i = 0; i < dec.length; i++) s += String.fromCharCode(dec[i]);
  return {counts: enc.counts, size: enc.size, decoded: btoa(s), area: rle.area(dec), bbox: rle.bbox(dec, h, w),
          box: box ? [box[0], box[1], box[2] - box[0] + 1, box[3] - box[1] + 1] : [0, 0, 0, 0]};
}"""


def blobs(rng, h, w, n=4):
    """Smooth shapes: a few discs and rectangles (long runs, like real masks)."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), bool)
    for _ in range(n):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.5, max(1.0, max(h, w) / 3))
        if rng.random() < 0.5:
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            m[int(cy):int(cy + r), int(cx):int(cx + r)] = True
    return m


def cases():
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(1, 1), (1, 9), (9, 1), (2, 3), (7, 5), (13, 31), (64, 48), (120, 97), (480, 640), (37, 1021)]:
        out.append((f"speckle-{h}x{w}", rng.random((h, w)) < rng.uniform(0.05, 0.95)))
        out.append((f"blobs-{h}x{w}", blobs(rng, h, w)))
    for h, w in [(1, 1), (5, 8), (480, 640), (1500, 2250)]:
        out.append((f"empty-{h}x{w}", np.zeros((h, w), bool)))
        out.append((f"full-{h}x{w}", np.ones((h, w), bool)))
    first = np.zeros((40, 30), bool)
    first[0, 0] = True  # starts with a 1: a leading zero-length run
    out.append(("first-pixel", first))
    last = np.zeros((40, 30), bool)
    last[-1, -1] = True
    out.append(("last-pixel", last))
    big = np.zeros((1500, 2250), bool)  # long runs (multi-chunk numbers) and large negative deltas
    big[100:1400, 50:60] = True
    big[3:5, 1000:2200] = True
    big[700:1500, 2249] = True
    out.append(("big-runs-1500x2250", big))
    out.append(("big-blobs-1500x2250", blobs(rng, 1500, 2250, n=8)))
    return out


@pytest.fixture(scope="module")
def page(chromium, static_server):  # noqa: F811
    p = chromium.page()
    p.goto(f"{static_server}/static/")
    return p


CASES = cases()


@pytest.mark.parametrize("name,mask", CASES, ids=[c[0] for c in CASES])
def test_rle_js_matches_pycocotools(page, name, mask):
    h, w = mask.shape
    ref = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = ref["counts"].decode()
    b64 = base64.b64encode(mask.astype(np.uint8).tobytes()).decode()  # row-major, as the page holds it
    got = page.evaluate(JS, [b64, h, w, counts])
    assert got["size"] == [h, w]
    assert got["counts"] == counts, "encode differs from pycocotools"
    decoded = np.frombuffer(base64.b64decode(got["decoded"]), np.uint8).reshape(h, w)
    assert np.array_equal(decoded, mask.astype(np.uint8)), "decode differs from pycocotools"
    assert got["area"] == int(mask_utils.area(ref))
    assert got["bbox"] == [int(v) for v in mask_utils.toBbox(ref)]
    assert got["box"] == got["bbox"], "decodeWithBox's bounds differ from the pixels'"


def test_rle_js_rejects_runs_that_do_not_tile(page):
    bad = mask_utils.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))["counts"].decode()
    err = page.evaluate("""async (counts) => {
      const rle = await import('/static/rle.js');
      try { rle.decode({size: [5, 5], counts}); return null; } catch (e) { return e.message; }
    }""", bad)
    assert err and "tile" in err


def test_rle_js_round_trips_random_counts(page):
    """Counts strings decoded then encoded by the page come back identical (pycocotools' own strings)."""
    rng = np.random.default_rng(1)
    masks = [rng.random((rng.integers(1, 90), rng.integers(1, 90))) < 0.3 for _ in range(40)]
    refs = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    payload = [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode()} for r in refs]
    back = page.evaluate("""async (rles) => {
      const rle = await import('/static/rle.js');
      return rles.map((r) => rle.encode(rle.decode(r), r.size[0], r.size[1]).counts);
    }""", payload)
    assert back == [p["counts"] for p in payload]
