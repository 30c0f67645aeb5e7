"""Typed containers round-trip through proto and bytes; keys are deterministic and safe."""

import re

import numpy as np
import pytest

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import MaskRecord, decode_rle, encode_rle, rle_counts
from services.common.settings import Settings


def _mask(h=7, w=5):
    m = np.zeros((h, w), bool)
    m[1:4, 2:5] = True
    return m


def test_rle_round_trip_matches_pycocotools_layout():
    m = _mask()
    rle = encode_rle(m)
    assert rle["size"] == [7, 5] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), m)


def test_rle_counts_read_pycocotools_strings_and_uncompressed_counts_decode_alike():
    rng = np.random.default_rng(3)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 60, size=2))
        m = rng.random((h, w)) < rng.random()
        rle = encode_rle(m)
        runs = rle_counts(rle["counts"])
        assert sum(runs) == h * w
        assert np.array_equal(decode_rle({"size": [h, w], "counts": runs}), m)
        assert np.array_equal(decode_rle({"size": [h, w], "counts": rle["counts"].encode()}), m)


@pytest.mark.parametrize("rle, phrase", [
    ({"size": [4, 5], "counts": "0"}, "runs cover 0 pixels, not 4x5 = 20"),  # pycocotools: garbage
    ({"size": [2, 2], "counts": [3, 4]}, "runs cover 7 pixels"),
    ({"size": [4, 5], "counts": [-1, 21]}, "some negative"),
    ({"size": [4, 5], "counts": "o"}, "ends inside a run"),
    ({"size": [4, 5], "counts": "\x01"}, "not an RLE digit"),
    ({"size": [4], "counts": "0"}, "size must be [H, W]"),
    ({"size": [4, 5], "counts": 20}, "counts must be a string or a list of ints"),
    ("not a mapping", "must be a mapping"),
])
def test_decode_rle_refuses_runs_that_do_not_tile_the_mask(rle, phrase):
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        decode_rle(rle)


def test_mask_record_proto_and_json_round_trip():
    rec = MaskRecord(segmentation=encode_rle(_mask()), bbox=[2, 1, 3, 3], area=9, predicted_iou=0.5,
                     stability_score=0.25, point_coords=[[3.0, 2.0]], crop_box=[0, 0, 5, 7])
    assert MaskRecord.from_proto(rec.to_proto()).to_json() == rec.to_json()
    assert MaskRecord.from_json(rec.to_json()) == MaskRecord.from_json(rec.to_json())
    assert np.array_equal(MaskRecord.from_json(rec.to_json()).decode(), _mask())


def test_embedding_bytes_round_trip_in_fp16():
    feats = np.random.default_rng(0).standard_normal((1, 32, 64, 64)).astype(np.float32)
    emb = StoredEmbedding(features=feats, model_id="tiny-abc", image_id="f" * 64, original_size=(10, 20),
                          input_size=(512, 1024), crop_box=(0, 0, 20, 10))
    back = StoredEmbedding.from_bytes(emb.to_bytes())
    assert back.features.dtype == np.float16
    np.testing.assert_allclose(back.features, feats, rtol=1e-3, atol=1e-3)
    assert (back.model_id, back.original_size, back.input_size, back.crop_box) == \
        ("tiny-abc", (10, 20), (512, 1024), (0, 0, 20, 10))
    ref = back.to_proto("k")
    assert (ref.original_height, ref.original_width, list(ref.crop_box)) == (10, 20, [0, 0, 20, 10])


@pytest.mark.parametrize("data", [b"", b"not an npz", b"PK\x03\x04garbage"])
def test_unreadable_embedding_is_failed_precondition(data):
    with pytest.raises(FailedPrecondition, match="not a readable embedding"):
        StoredEmbedding.from_bytes(data, key="embeddings/x")


def test_keys_are_deterministic_and_reject_traversal():
    a = keys.embedding_key("vit_b-1", "abc", (0, 0, 10, 20))
    assert a == keys.embedding_key("vit_b-1", "abc", (0, 0, 10, 20)) == "embeddings/vit_b-1/abc/0_0_10_20.npz"
    for bad in ("..", "a/b", "", "x y"):
        with pytest.raises(ValueError):
            keys.embedding_key(bad, "abc", (0, 0, 1, 1))


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAENGINE_MODEL_TYPE", "vit_h")
    monkeypatch.setenv("DATAENGINE_EMBED_BATCH_SIZE", "8")
    s = Settings()
    assert (s.model_type, s.embed_batch_size, s.port_of("decoder")) == ("vit_h", 8, 50052)


@pytest.mark.parametrize("env, message", [
    ({"DATAENGINE_STORE": "minio"}, "MINIO_ACCESS_KEY"),         # required value missing
    ({"DATAENGINE_MODEL_TYPE": "vit_x"}, "model_type"),           # unknown variant
    ({"DATAENGINE_EMBED_BATCH_SIZE": "0"}, "embed_batch_size"),   # out of range
])
def test_bad_settings_stop_with_a_clear_message(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=message):
        Settings()
