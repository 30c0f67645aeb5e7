"""The Decoder gRPC service over loopback: good requests, a table of bad ones (status code and a
message naming the problem), health, message limits; the server keeps answering throughout."""

from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.masks import MaskRecord
from services.common.pb import common_pb2, decoder_pb2, decoder_pb2_grpc
from services.common.sam_models import load_sam
from services.common.storage import LocalStore
from services.decoder import amg, servicer
from services.decoder.core import DecoderCore
from services.common.amg_params import AmgParams
from tests.decoder.builders import blob_image, embed, put
from tests.servers import grpc_loopback

H, W = 96, 128
LIMIT = 1 << 20  # server's message limit in this test: 1 MiB


def P(x, y, label=1):
    return common_pb2.Point(x=x, y=y, label=label)


@pytest.fixture(scope="module")
def env(tiny_checkpoint, tmp_path_factory):
    """A started server, a client stub and the keys of the stored embeddings."""
    sam = load_sam("tiny", tiny_checkpoint, "cpu")
    store = LocalStore(tmp_path_factory.mktemp("bucket"))
    pixels = blob_image(H, W, seed=1)
    full = embed(sam, pixels, "img1")
    keys = {"full": put(store, full),
            "foreign": put(store, embed(sam, pixels, "img1", model_id="vit_b-0123456789ab")),
            "crop": put(store, embed(sam, pixels, "img1", crop_box=(32, 16, 96, 64))),
            "missing_logits": f"logits/{sam.decoder_id}/img1/{'0' * 32}.npy"}
    core = DecoderCore(sam, store, cache_size=8)
    # The client may send more than the server accepts, to see the server's limit answer.
    with grpc_loopback(lambda s: servicer.add_to_server(s, core), LIMIT, client_max_bytes=8 * LIMIT) as (channel, _):
        yield {"stub": decoder_pb2_grpc.DecoderStub(channel), "channel": channel, "keys": keys, "store": store,
               "model_id": sam.encoder_id, "sam": sam, "pixels": pixels, "full": full}
    core.close()


def good_predict(env) -> decoder_pb2.PredictResponse:
    return env["stub"].Predict(decoder_pb2.PredictRequest(embedding_key=env["keys"]["full"],
                                                          points=[P(60, 40)], multimask_output=True))


def test_predict_returns_masks_and_a_logits_key(env):
    reply = good_predict(env)
    assert len(reply.masks) == 3
    assert [m.predicted_iou for m in reply.masks] == sorted((m.predicted_iou for m in reply.masks), reverse=True)
    assert all(list(m.segmentation.size) == [H, W] for m in reply.masks)
    assert MaskRecord.from_proto(reply.masks[0]).decode().shape == (H, W)
    follow = env["stub"].Predict(decoder_pb2.PredictRequest(
        embedding_key=env["keys"]["full"], points=[P(60, 40), P(5, 5, 0)], mask_input_key=reply.logits_key))
    assert len(follow.masks) == 1


def test_inline_mask_input(env):
    logits = np.zeros((1, 256, 256), "<f4").tobytes()
    reply = env["stub"].Predict(decoder_pb2.PredictRequest(embedding_key=env["keys"]["full"],
                                                           mask_input_logits=logits))
    assert len(reply.masks) == 1


def _predict(**kw):
    def build(keys):
        fields = {"embedding_key": keys["full"], **kw}
        if callable(fields["embedding_key"]):
            fields["embedding_key"] = fields["embedding_key"](keys)
        return "Predict", decoder_pb2.PredictRequest(**fields)
    return build


def _generate(key="full", **params):
    def build(keys):
        return "GenerateMasks", decoder_pb2.GenerateMasksRequest(
            embedding_key=keys.get(key, key), params=decoder_pb2.AmgParams(**params))
    return build


INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)
BAD_REQUESTS = [
    # (id, request, expected code, words the message must contain)
    ("point right of image", _predict(points=[P(W + 5, 10)]), INVALID, ["point 0", f"{W}x{H}", "outside"]),
    ("point above image", _predict(points=[P(10, 10), P(10, -1)]), INVALID, ["point 1", "outside"]),
    ("NaN coordinate", _predict(points=[P(math.nan, 10)]), INVALID, ["point 0", "non-finite"]),
    ("inf coordinate", _predict(points=[P(10, math.inf)]), INVALID, ["point 0", "non-finite"]),
    ("empty prompt", _predict(), INVALID, ["empty prompt"]),
    ("label 2", _predict(points=[P(10, 10, 2)]), INVALID, ["label 2", "foreground"]),
    ("label -1", _predict(points=[P(10, 10, -1)]), INVALID, ["label -1"]),
    ("box x1 < x0", _predict(box=common_pb2.Box(x0=50, y0=10, x1=20, y1=40)), INVALID, ["x1 < x0"]),
    ("box outside", _predict(box=common_pb2.Box(x0=0, y0=0, x1=W * 2, y1=H)), INVALID, ["box", "outside"]),
    ("NaN box", _predict(box=common_pb2.Box(x0=0, y0=0, x1=math.nan, y1=H)), INVALID, ["box", "non-finite"]),
    ("mask input wrong size", _predict(mask_input_logits=b"\0" * 1000), INVALID,
     ["mask_input_logits", "1000 bytes", "262144"]),
    ("NaN mask input", _predict(mask_input_logits=np.full((1, 256, 256), np.nan, "<f4").tobytes()), INVALID,
     ["NaN"]),
    ("another image's logits key", _predict(points=[P(10, 10)], mask_input_key="logits/x/y/z.npy"), INVALID,
     ["mask_input_key", "logits/x/y/z.npy"]),
    ("unknown logits key", lambda k: _predict(points=[P(10, 10)], mask_input_key=k["missing_logits"])(k),
     NOT_FOUND, ["mask_input_key", "not found"]),
    ("unknown embedding key", _predict(embedding_key="embeddings/nope/img/0_0_1_1.npz", points=[P(1, 1)]),
     NOT_FOUND, ["embeddings/nope/img/0_0_1_1.npz", "not found"]),
    ("empty embedding key", _predict(embedding_key="", points=[P(1, 1)]), INVALID, ["embedding_key"]),
    ("path traversal", _predict(embedding_key="../../etc/passwd", points=[P(1, 1)]), INVALID, [".."]),
    ("other model's embedding", _predict(embedding_key=lambda k: k["foreign"], points=[P(1, 1)]), PRECONDITION,
     ["vit_b-0123456789ab", "tiny-"]),
    ("invalid AmgParams", _generate(points_per_side=0), INVALID, ["points_per_side"]),
    ("GenerateMasks unknown key", _generate("embeddings/nope/img/0_0_1_1.npz"), NOT_FOUND, ["nope"]),
    ("missing crop embedding", _generate(crop_n_layers=1, points_per_side=4), PRECONDITION,
     ["crop box", "crop_n_layers=1", "crop_overlap_ratio"]),
    ("crop embedding to GenerateMasks", _generate("crop"), PRECONDITION, ["full-image embedding"]),
    ("over the message limit", _predict(points=[P(1, 1)], mask_input_logits=b"\0" * (2 * LIMIT)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, []),
]


@pytest.mark.parametrize("build,code,words", [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_a_status_naming_the_problem(env, build, code, words):
    method, request = build(env["keys"])
    with pytest.raises(grpc.RpcError) as err:
        getattr(env["stub"], method)(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details()
    assert len(good_predict(env).masks) == 3  # the server still answers


def test_generate_masks_stores_sa1b_json(env):
    reply = env["stub"].GenerateMasks(decoder_pb2.GenerateMasksRequest(
        embedding_key=env["keys"]["full"],
        params=decoder_pb2.AmgParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)))
    assert reply.image_id == "img1" and reply.masks_key.startswith(f"masks/{env['model_id']}/img1/")
    document = json.loads(env["store"].get(reply.masks_key))
    assert document["image"] == {"image_id": "img1", "height": H, "width": W, "file_name": ""}
    assert len(document["annotations"]) == len(reply.masks)
    for i, (ann, mask) in enumerate(zip(document["annotations"], reply.masks)):
        assert ann["id"] == i and ann["segmentation"]["counts"] == mask.segmentation.counts


def test_generate_masks_with_crop_layers_reads_every_crop(env):
    params = AmgParams(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, crop_n_layers=1,
                       crop_overlap_ratio=0.25)
    embeddings = {}
    for box in amg.crop_boxes((H, W), params):
        embeddings[box] = env["full"] if box == (0, 0, W, H) else embed(env["sam"], env["pixels"], "img1", box)
        put(env["store"], embeddings[box])
    reply = env["stub"].GenerateMasks(decoder_pb2.GenerateMasksRequest(
        embedding_key=env["keys"]["full"], params=params.to_proto()))
    expected = amg.generate(env["sam"].model, embeddings, (H, W), params)
    assert len(expected) > 0
    assert [MaskRecord.from_proto(m).segmentation for m in reply.masks] == [r.segmentation for r in expected]


def test_health_serving(env):
    health = health_pb2_grpc.HealthStub(env["channel"])
    for name in ("", servicer.SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
