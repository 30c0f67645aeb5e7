"""EmbedderCore against segment-anything's own SamPredictor: same features, batched or not,
crops where generate_crop_boxes puts them, fp16 in the store, bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import generate_crop_boxes
from segment_anything.utils.transforms import ResizeLongestSide

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.errors import InvalidInput, NotFound
from services.embedder.core import EmbedderCore
from services.common.image_source import ImageSource
from services.embedder.types import EmbeddedImage
from tests.common.image_cases import BAD_IMAGES, png, rgb_array

# Landscape, portrait and square: each pads differently to the 1024 input.
SHAPES = [(40, 64), (70, 30), (17, 17)]
FP16_RTOL, FP16_ATOL = 2.0 ** -11, 6e-8  # half an fp16 ulp, and the subnormal step


@pytest.fixture(scope="module")
def official_features(tiny_sam) -> list[np.ndarray]:
    """SamPredictor(model).set_image(image).features for each of SHAPES (1xCx64x64 fp32)."""
    predictor = SamPredictor(tiny_sam.model)
    out = []
    for i, (h, w) in enumerate(SHAPES):
        predictor.set_image(rgb_array(h, w, seed=i))
        out.append(predictor.features.cpu().numpy())
    return out


def test_fp32_features_equal_the_official_predictor(tiny_sam, official_features):
    core = EmbedderCore(tiny_sam, None, batch_size=len(SHAPES), max_pixels=10**8)
    images = [rgb_array(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)]
    features, input_sizes = core.encode(images)  # all three in one forward pass
    assert features.shape == (3, 32, 64, 64) and features.dtype == torch.float32
    for i, (h, w) in enumerate(SHAPES):
        np.testing.assert_allclose(features[i:i + 1].numpy(), official_features[i], rtol=0, atol=1e-5)
        assert input_sizes[i] == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


def test_batched_equals_one_by_one_and_fp16_round_trips(tiny_sam, official_features):
    images = [rgb_array(h, w, seed=i) for i, (h, w) in enumerate(SHAPES)]
    batched = EmbedderCore(tiny_sam, None, batch_size=2, max_pixels=10**8).compute(images)  # batches 2 + 1
    single = EmbedderCore(tiny_sam, None, batch_size=1, max_pixels=10**8).compute(images)
    for i, (h, w) in enumerate(SHAPES):
        (b,), (s,) = batched[i], single[i]
        assert b.features.dtype == np.float16 and b.features.shape == (1, 32, 64, 64)
        np.testing.assert_allclose(b.features.astype(np.float32), s.features.astype(np.float32), atol=1e-3)
        np.testing.assert_allclose(b.features.astype(np.float32), official_features[i],
                                   rtol=FP16_RTOL, atol=FP16_ATOL)
        assert (b.original_size, b.crop_box) == ((h, w), (0, 0, w, h))
        again = StoredEmbedding.from_bytes(b.to_bytes())
        assert np.array_equal(again.features, b.features)  # the stored bytes hold exactly the fp16 values
        assert (again.model_id, again.original_size, again.input_size, again.crop_box) == (
            b.model_id, b.original_size, b.input_size, b.crop_box)


def test_crops_follow_generate_crop_boxes_and_match_the_predictor_on_the_crop(tiny_sam):
    h, w = 60, 90
    images = [rgb_array(h, w, seed=5)]
    core = EmbedderCore(tiny_sam, None, batch_size=3, max_pixels=10**8)  # 5 inputs: batches of 3 + 2
    out = core.compute(images, crop_n_layers=1, crop_overlap_ratio=0.25, image_ids=["a"])
    for image, embeddings, image_id in zip(images, out, ["a"]):
        boxes, _ = generate_crop_boxes(image.shape[:2], 1, 0.25)
        assert [list(e.crop_box) for e in embeddings] == boxes  # full image first, official order
        for e in embeddings:
            x0, y0, x1, y1 = e.crop_box
            assert e.image_id == image_id and e.original_size == (y1 - y0, x1 - x0)
            assert e.input_size == ResizeLongestSide.get_preprocess_shape(y1 - y0, x1 - x0, 1024)
    # One crop (the bottom-right one) through the official path, as the official generator does.
    x0, y0, x1, y1 = out[0][-1].crop_box
    predictor = SamPredictor(tiny_sam.model)
    predictor.set_image(images[0][y0:y1, x0:x1])
    np.testing.assert_allclose(out[0][-1].features.astype(np.float32), predictor.features.numpy(),
                               rtol=FP16_RTOL, atol=FP16_ATOL)


def test_embed_stores_image_and_embeddings_under_deterministic_keys(core, local_store):
    data = png(24, 40)
    local_store.put("uploads/cat.png", data)
    results = core.embed([data, "uploads/cat.png", ImageSource(data=png(10, 12, seed=1), filename="x.png")])
    assert [type(r) for r in results] == [EmbeddedImage] * 3
    assert results[0].image_id == results[1].image_id == keys.sha256_hex(data)  # order kept, same image
    assert local_store.get(keys.image_key(results[0].image_id)) == data
    ref = results[0].embeddings[0]
    assert ref.key == keys.embedding_key(core.model_id, ref.image_id, (0, 0, 40, 24))
    stored = StoredEmbedding.from_bytes(local_store.get(ref.key))
    assert (stored.model_id, stored.original_size, stored.input_size) == (core.model_id, (24, 40), (614, 1024))
    assert EmbeddedImage.from_proto(results[2].to_proto()) == results[2]

    before = sorted(local_store.list())
    again = core.embed([data])  # re-running overwrites, never duplicates
    assert again[0] == results[0] and sorted(local_store.list()) == before


def test_embed_missing_key_is_not_found_naming_it(core):
    with pytest.raises(NotFound, match="images/nope.png"):
        core.embed([png(), "images/nope.png"])


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_embed_bad_image_names_which_one(core, local_store, name):
    data, phrase = BAD_IMAGES[name]
    local_store.put("in/bad.bin", data)
    with pytest.raises(InvalidInput, match=phrase) as err:
        core.embed([png(), "in/bad.bin"])
    assert "image 1 (key 'in/bad.bin')" in str(err.value)
    with pytest.raises(InvalidInput, match="image 0 \\(photo.jpg\\)"):
        core.embed([ImageSource(data=data, filename="photo.jpg")])


@pytest.mark.parametrize("pixels, kwargs, message", [
    # not HxWx3 uint8
    (np.zeros((8, 8), np.uint8), {}, "expected HxWx3 uint8"),
    (np.zeros((8, 8, 3), np.float32), {}, "expected HxWx3 uint8"),
    # 1x1 cannot be cut into crops
    (np.zeros((1, 1, 3), np.uint8), {"crop_n_layers": 1}, "too small for crop_n_layers=1"),
    # ResizeLongestSide would round the short side to 0 pixels
    (np.zeros((1, 3000, 3), np.uint8), {}, "aspect ratio too extreme"),
    # crop settings out of range
    (np.zeros((8, 8, 3), np.uint8), {"crop_n_layers": 4}, "crop_n_layers must be in"),
    (np.zeros((8, 8, 3), np.uint8), {"crop_n_layers": -1}, "crop_n_layers must be in"),
    (np.zeros((8, 8, 3), np.uint8), {"crop_overlap_ratio": 1.0}, "crop_overlap_ratio must be in"),
    (np.zeros((8, 8, 3), np.uint8), {"crop_overlap_ratio": float("nan")}, "crop_overlap_ratio must be in"),
])
def test_compute_rejects_unusable_input(tiny_sam, pixels, kwargs, message):
    core = EmbedderCore(tiny_sam, None, batch_size=1, max_pixels=10**8)
    with pytest.raises(InvalidInput, match=message):
        core.compute([pixels], **kwargs)


def test_one_pixel_image_embeds(tiny_sam):
    (emb,), = EmbedderCore(tiny_sam, None, 1, 10**8).compute([np.full((1, 1, 3), 200, np.uint8)])
    assert emb.original_size == (1, 1) and emb.input_size == (1024, 1024)
    assert np.isfinite(emb.features).all()


def test_embed_without_images_is_invalid(core):
    with pytest.raises(InvalidInput, match="no images"):
        core.embed([])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tiny_checkpoint, tiny_sam):
    from services.common.sam_models import load_sam

    image = rgb_array(40, 64)
    cpu = EmbedderCore(tiny_sam, None, 1, 10**8).compute([image])[0][0]
    cuda = EmbedderCore(load_sam("tiny", tiny_checkpoint, "cuda"), None, 1, 10**8).compute([image])[0][0]
    np.testing.assert_allclose(cuda.features.astype(np.float32), cpu.features.astype(np.float32), atol=2e-2)
