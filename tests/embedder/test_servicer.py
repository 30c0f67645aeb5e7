"""The Embedder gRPC service over loopback, on a local directory and on an S3 server (moto,
through the minio client): results, health, reflection, and a status naming each bad input."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.pb import common_pb2, embedder_pb2, embedder_pb2_grpc
from services.embedder.core import EmbedderCore
from services.embedder.servicer import SERVICE_NAME, add_to_server
from tests.common.image_cases import BAD_IMAGES, png
from tests.servers import grpc_loopback

MAX_MESSAGE = 16 << 20


@pytest.fixture(params=["local_store", "minio_store"])
def store(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def channel(tiny_sam, store):
    core = EmbedderCore(tiny_sam, store, batch_size=2, max_pixels=100_000)
    with grpc_loopback(lambda s: add_to_server(s, core), MAX_MESSAGE) as (chan, _):
        yield chan


def _embed(channel, *refs, **kw) -> embedder_pb2.EmbedResponse:
    stub = embedder_pb2_grpc.EmbedderStub(channel)
    return stub.Embed(embedder_pb2.EmbedRequest(images=list(refs), **kw), timeout=60)


def test_embed_inline_and_by_key(channel, store):
    data = png(24, 40)
    store.put("uploads/a.png", png(30, 20, seed=2))
    reply = _embed(channel, common_pb2.ImageRef(data=data, filename="a.png"), common_pb2.ImageRef(key="uploads/a.png"))
    first, second = reply.images
    assert first.image_id == keys.sha256_hex(data)
    ref = first.embeddings[0]
    assert (ref.original_height, ref.original_width, ref.input_height, ref.input_width) == (24, 40, 614, 1024)
    assert list(ref.crop_box) == [0, 0, 40, 24] and ref.model_id.startswith("tiny-")
    stored = StoredEmbedding.from_bytes(store.get(ref.key))
    assert stored.features.dtype == np.float16 and stored.image_id == first.image_id
    assert list(second.embeddings[0].crop_box) == [0, 0, 20, 30]
    assert store.get(f"images/{first.image_id}") == data  # later stages read it from here


@pytest.mark.parametrize("store", ["local_store"], indirect=True)
def test_crop_layers_over_grpc(channel):
    reply = _embed(channel, common_pb2.ImageRef(data=png(30, 45)), crop_n_layers=1, crop_overlap_ratio=0.0)
    boxes = [list(e.crop_box) for e in reply.images[0].embeddings]
    assert boxes[0] == [0, 0, 45, 30] and len(boxes) == 5


@pytest.mark.parametrize("store", ["local_store"], indirect=True)
def test_health_serving_and_reflection_lists_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=10)
    names = {s.name for s in answer.list_services_response.service}
    assert {"dataengine.v1.Embedder", "grpc.health.v1.Health"} <= names


def test_reflection_off_hides_the_services():
    """DATAENGINE_GRPC_REFLECTION=false: grpcurl and friends learn nothing; health still answers."""
    from services.common.grpc_server import build_server, client_channel

    server, port = build_server(lambda s: [SERVICE_NAME], "127.0.0.1:0", 4 << 20, workers=2, reflection_on=False)
    server.start()
    try:
        with client_channel(f"127.0.0.1:{port}", 4 << 20) as channel:
            request = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            with pytest.raises(grpc.RpcError) as err:
                list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(request, timeout=10))
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0).wait()


# request field overrides -> (status, phrase in the details)
BAD_REQUESTS = {
    "no images": ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    "neither data nor key": ({"images": [common_pb2.ImageRef(filename="x")]},
                             grpc.StatusCode.INVALID_ARGUMENT, "image 0 has neither data nor key"),
    "crop_n_layers too high": ({"crop_n_layers": 4}, grpc.StatusCode.INVALID_ARGUMENT, "crop_n_layers"),
    "crop_n_layers negative": ({"crop_n_layers": -1}, grpc.StatusCode.INVALID_ARGUMENT, "crop_n_layers"),
    "overlap 1": ({"crop_overlap_ratio": 1.0}, grpc.StatusCode.INVALID_ARGUMENT, "crop_overlap_ratio"),
    "overlap negative": ({"crop_overlap_ratio": -0.1}, grpc.StatusCode.INVALID_ARGUMENT, "crop_overlap_ratio"),
    "unknown key": ({"images": [common_pb2.ImageRef(key="images/missing.png")]},
                    grpc.StatusCode.NOT_FOUND, "images/missing.png"),
    "key escaping the bucket": ({"images": [common_pb2.ImageRef(key="../etc/passwd")]},
                                grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
    # over the server's max_pixels (100_000) in this test
    "too many pixels": ({"images": [common_pb2.ImageRef(data=png(400, 300))]},
                        grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 100000"),
    **{f"bad image: {name}": ({"images": [common_pb2.ImageRef(data=data, filename=f"{name}.png")]},
                              grpc.StatusCode.INVALID_ARGUMENT, phrase)
       for name, (data, phrase) in BAD_IMAGES.items()},
}


@pytest.mark.parametrize("store", ["local_store", "minio_store"], indirect=True)
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_status_naming_the_problem(channel, case):
    fields, code, phrase = BAD_REQUESTS[case]
    request = {"images": [common_pb2.ImageRef(data=png())], **fields}
    with pytest.raises(grpc.RpcError) as err:
        _embed(channel, *request.pop("images"), **request)
    assert err.value.code() == code
    assert phrase in err.value.details()
    # The server keeps serving after every rejection.
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("store", ["local_store"], indirect=True)
def test_message_over_the_size_limit_is_refused(channel):
    big = common_pb2.ImageRef(data=b"\0" * (MAX_MESSAGE + 1))
    with pytest.raises(grpc.RpcError) as err:
        _embed(channel, big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
