"""`dataengine serve` as a real process: gRPC and the Celery worker over one model, SIGTERM drains."""

import io
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from services.common.grpc_server import channel_options
from services.common.pb import (common_pb2, concepts_pb2, concepts_pb2_grpc, embedder_pb2, embedder_pb2_grpc,
                                orchestrator_pb2, orchestrator_pb2_grpc, verifier_pb2, verifier_pb2_grpc)
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from tests.conftest import S3_KEY, S3_SECRET
from tests.servers import free_port

pytestmark = pytest.mark.slow


def _png(h=32, w=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wait_serving(channel, service="dataengine.v1.Embedder", deadline_s=120):
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{service} never reported SERVING")


def test_serve_embedder_grpc_and_worker_then_sigterm(redis_url, s3_endpoint, tiny_checkpoint, tmp_path):
    port = free_port()
    bucket = f"serve-{port}"
    env = {**os.environ, "DATAENGINE_STORE": "minio", "DATAENGINE_MINIO_ENDPOINT": s3_endpoint,
           "DATAENGINE_MINIO_ACCESS_KEY": S3_KEY, "DATAENGINE_MINIO_SECRET_KEY": S3_SECRET,
           "DATAENGINE_BUCKET": bucket, "DATAENGINE_BROKER_URL": redis_url, "DATAENGINE_MODEL_TYPE": "tiny",
           "DATAENGINE_CHECKPOINT": str(tiny_checkpoint), "DATAENGINE_EMBEDDER_PORT": str(port),
           "DATAENGINE_HOST": "127.0.0.1", "DATAENGINE_SHUTDOWN_GRACE_S": "2"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.app.cli", "serve", "embedder"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 << 20))
        _wait_serving(channel)
        stub = embedder_pb2_grpc.EmbedderStub(channel)
        reply = stub.Embed(embedder_pb2.EmbedRequest(images=[common_pb2.ImageRef(data=_png())]), timeout=60)
        assert len(reply.images) == 1 and reply.images[0].embeddings[0].original_height == 32

        # The worker in the same process takes tasks from queue "embedder": a bad key fails with
        # its reason, and the worker goes on to embed the image the gRPC call stored.
        settings = Settings(broker_url=redis_url)
        client = create_celery(settings)
        bad = client.send_task("embedder.embed", args=[["images/does-not-exist"], 0, 512 / 1500])
        outcome = TaskOutcome.from_json(bad.get(timeout=60))
        assert not outcome.ok and "does-not-exist" in outcome.reason
        good_key = f"images/{reply.images[0].image_id}"
        good = client.send_task("embedder.embed", args=[[good_key], 0, 512 / 1500])
        outcome = TaskOutcome.from_json(good.get(timeout=60))
        assert outcome.ok, outcome.reason
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("serve did not stop on SIGTERM")
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


# service -> (its gRPC service name, one call that must work on a fresh server)
OTHER_SERVICES = {
    "concepts": ("dataengine.v1.Concepts", lambda ch: concepts_pb2_grpc.ConceptsStub(ch).Propose(
        concepts_pb2.ProposeRequest(image=common_pb2.ImageRef(data=_png()), known_labels=["dog"]), timeout=30),
        lambda reply: [p.text for p in reply.phrases] == ["dog"]),
    "verifier": ("dataengine.v1.Verifier", lambda ch: verifier_pb2_grpc.VerifierStub(ch).Verify(
        verifier_pb2.VerifyRequest(image=common_pb2.ImageRef(data=_png()),
                                   pairs=[verifier_pb2.PhraseMasks(phrase="cat", is_negative=True)]), timeout=30),
        lambda reply: [p.phrase for p in reply.pairs] == ["cat"] and 0 <= reply.pairs[0].score <= 1),
    "orchestrator": ("dataengine.v1.Orchestrator", lambda ch: orchestrator_pb2_grpc.OrchestratorStub(ch).Submit(
        orchestrator_pb2.SubmitRequest(images=[common_pb2.ImageRef(data=_png(), filename="a.png")]), timeout=30),
        lambda reply: len(reply.item_ids) == 1),
}


@pytest.mark.parametrize("service", sorted(OTHER_SERVICES))
def test_serve_every_other_service_then_sigterm(service, broker, tmp_path):
    name, call, check = OTHER_SERVICES[service]
    port = free_port()
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
           "DATAENGINE_BROKER_URL": broker, f"DATAENGINE_{service.upper()}_PORT": str(port),
           "DATAENGINE_HOST": "127.0.0.1", "DATAENGINE_SHUTDOWN_GRACE_S": "2"}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.app.cli", "serve", service], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 << 20))
        _wait_serving(channel, name)
        assert check(call(channel))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"serve {service} did not stop on SIGTERM")
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
