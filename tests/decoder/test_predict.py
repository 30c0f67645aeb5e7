"""DecoderCore.predict on the tiny SAM: shapes, ordering, prompts of every kind, and equality with
segment-anything's SamPredictor on the same fp16-rounded embedding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import calculate_stability_score

from services.common.masks import decode_rle
from services.common.sam_models import load_sam
from services.common.storage import LocalStore
from services.decoder.cache import LruCache
from services.decoder.core import DecoderCore, upscale_logits
from services.decoder.prompts import Prompt
from tests.decoder.builders import blob_image, embed, official_predictor, put

H, W = 90, 140  # landscape, not a multiple of 16: padding and resizing both matter


@pytest.fixture(scope="module")
def sam(tiny_checkpoint):
    return load_sam("tiny", tiny_checkpoint, "cpu")


@pytest.fixture(scope="module")
def stored(sam):
    return embed(sam, blob_image(H, W), image_id="img0")


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "bucket")


@pytest.fixture
def core(sam, store):
    core = DecoderCore(sam, store, cache_size=4)
    yield core
    core.close()


def prompt(key, points=(), labels=None, box=None, multimask=True, **kw) -> Prompt:
    points = np.array(points, np.float32).reshape(-1, 2)
    labels = np.array(labels if labels is not None else [1] * len(points), np.int32)
    return Prompt(key, points, labels, None if box is None else np.array(box, np.float32),
                  multimask_output=multimask, **kw)


def official(sam, emb, p: Prompt, mask_input=None):
    """Masks (CxHxW bool), IoU (C) and full-res logits of SamPredictor, sorted best first."""
    predictor = official_predictor(sam, emb)
    logits, iou, low_res = predictor.predict(
        point_coords=p.points if len(p.points) else None, point_labels=p.labels if len(p.points) else None,
        box=p.box, mask_input=mask_input, multimask_output=p.multimask_output, return_logits=True)
    order = np.argsort(-iou, kind="stable")
    return logits[order], iou[order], low_res[order]


def assert_matches_official(result, logits, iou, threshold=0.0):
    assert len(result.masks) == len(iou)
    for rec, ref_logits, ref_iou in zip(result.masks, logits, iou):
        mask = decode_rle(rec.segmentation)
        ref = ref_logits > threshold
        # fp32 reductions may order differently; only pixels with logits at the threshold may flip.
        assert (mask != ref).mean() <= 1e-3
        assert rec.predicted_iou == pytest.approx(float(ref_iou), abs=1e-5)
        ref_stability = calculate_stability_score(torch.from_numpy(ref_logits)[None], threshold, 1.0)
        assert rec.stability_score == pytest.approx(float(ref_stability), abs=1e-3)
        assert rec.area == int(mask.sum())


@pytest.mark.parametrize("points,labels,box,multimask", [
    ([[70, 45]], [1], None, True),                      # one click, three candidates
    ([[70, 45]], [1], None, False),                     # one click, single mask
    ([[10, 10], [120, 80]], [1, 0], None, False),       # foreground + background
    ([], None, [20, 10, 110, 70], False),               # box only
    ([[60, 40]], [1], [20, 10, 110, 70], True),         # box + point
    ([[0, 0], [W, H]], [1, 1], None, True),             # the image's corners are inside
])
def test_predict_equals_official_predictor(sam, stored, store, core, points, labels, box, multimask):
    key = put(store, stored)
    p = prompt(key, points, labels, box, multimask)
    result = core.predict(p)
    assert_matches_official(result, *official(sam, stored, p)[:2])
    assert len(result.masks) == (3 if multimask else 1)
    ious = [m.predicted_iou for m in result.masks]
    assert ious == sorted(ious, reverse=True)
    for rec in result.masks:
        assert rec.segmentation["size"] == [H, W]
        assert rec.crop_box == [0.0, 0.0, float(W), float(H)]
        assert rec.point_coords == [[float(x), float(y)] for x, y in points]


def test_bbox_is_xywh_of_the_mask(stored, store, core):
    result = core.predict(prompt(put(store, stored), [[70, 45]]))
    for rec in result.masks:
        mask = decode_rle(rec.segmentation)
        if not mask.any():
            assert rec.bbox == [0, 0, 0, 0]
            continue
        ys, xs = np.nonzero(mask)
        # segment-anything's convention (batched_mask_to_box, then XYWH): w = right - left.
        assert rec.bbox == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_logits_key_feeds_the_next_click(sam, stored, store, core, tmp_path):
    key = put(store, stored)
    first = core.predict(prompt(key, [[70, 45]]))
    _, _, low_res = official(sam, stored, prompt(key, [[70, 45]]))

    second = prompt(key, [[70, 45], [30, 20]], [1, 0], multimask=False, mask_input_key=first.logits_key)
    result = core.predict(second)
    assert_matches_official(result, *official(sam, stored, second, mask_input=low_res[:1])[:2])

    # The logits reach the store too (Cx256x256 float32, best first), and a fresh decoder (empty
    # caches, e.g. another replica) reads them from there.
    core.flush()
    stored_logits = np.load(io.BytesIO(store.get(first.logits_key)))
    assert stored_logits.shape == (3, 256, 256) and stored_logits.dtype == np.float32
    np.testing.assert_allclose(stored_logits, low_res, atol=1e-4)
    fresh = DecoderCore(sam, store, cache_size=0)
    again = fresh.predict(second)
    assert [m.segmentation for m in again.masks] == [m.segmentation for m in result.masks]
    fresh.close()


def test_inline_mask_input_equals_official(sam, stored, store, core):
    key = put(store, stored)
    _, _, low_res = official(sam, stored, prompt(key, [[70, 45]]))
    p = prompt(key, [[70, 45]], multimask=False, mask_input=low_res[:1].astype(np.float32))
    assert_matches_official(core.predict(p), *official(sam, stored, p, mask_input=low_res[:1])[:2])


def test_crop_embedding_answers_in_the_crop_frame(sam, store, core):
    pixels = blob_image(H, W, seed=3)
    crop = (40, 20, 130, 85)
    emb = embed(sam, pixels, "img0", crop_box=crop)
    p = prompt(put(store, emb), [[30, 30]])
    result = core.predict(p)
    assert_matches_official(result, *official(sam, emb, p)[:2])
    assert result.masks[0].segmentation["size"] == [85 - 20, 130 - 40]
    assert result.masks[0].crop_box == [40.0, 20.0, 90.0, 65.0]


@pytest.mark.parametrize("input_size,original_size", [
    ((658, 1024), (90, 140)),    # landscape
    ((1024, 683), (1500, 1000)),  # portrait, upscaled
    ((1024, 1024), (64, 64)),    # square: nothing to skip
    ((1, 1024), (1, 1500)),      # one row
])
def test_upscale_logits_equals_sam_postprocess(sam, input_size, original_size):
    low_res = torch.randn(1, 1, 256, 256) * 10
    expected = sam.model.postprocess_masks(low_res, input_size, original_size)[0, 0].numpy()
    got = upscale_logits(low_res[0, 0].numpy(), input_size, original_size, 1024)
    assert got.shape == original_size
    # OpenCV computes the bilinear weights in float32: differences stay at float rounding level.
    np.testing.assert_allclose(got, expected, atol=5e-5 * np.abs(expected).max(), rtol=0)


def test_lru_cache_evicts_least_recent():
    cache = LruCache[int](2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "b" is now the least recent
    cache.put("c", 3)
    assert "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    empty = LruCache[int](0)
    empty.put("a", 1)
    assert len(empty) == 0


def test_cache_holds_the_embedding(stored, store, core):
    key = put(store, stored)
    core.predict(prompt(key, [[70, 45]]))
    store.delete(key)  # the next click does not go back to the store
    assert len(core.predict(prompt(key, [[71, 45]])).masks) == 3
