"""Celery task ``embedder.embed`` on a real Redis broker and real workers: a bad input is a
failure outcome with its reason, the worker goes on; storage trouble is retried."""

from __future__ import annotations

import os
import time

import pytest
from celery.contrib.testing.worker import start_worker

from services.common import keys
from services.common.embedding import StoredEmbedding
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.common.storage import MinioStore
from services.embedder.core import EmbedderCore
from services.embedder.tasks import TASK_NAME, register_tasks
from tests.common.image_cases import BAD_IMAGES, png
from tests.conftest import S3_KEY, S3_SECRET
from tests.servers import celery_worker, s3_server

def _app(broker: str):
    return create_celery(Settings(broker_url=broker))


def _run(app, *args, timeout: float = 60) -> TaskOutcome:
    return TaskOutcome.from_json(app.send_task(TASK_NAME, args=list(args)).get(timeout=timeout))


def test_outcomes_on_an_in_process_worker(broker, tiny_sam, local_store):
    app = _app(broker)
    register_tasks(app, lambda: EmbedderCore(tiny_sam, local_store, batch_size=2, max_pixels=10**6))
    local_store.put("in/a.png", png(24, 40))
    local_store.put("in/empty.png", BAD_IMAGES["zero_bytes"][0])
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["embedder"]):
        good = _run(app, ["in/a.png"], 1, 0.0)
        assert good.ok, good.reason
        (image_id,) = good.outputs["image_ids"]
        (embedding_keys,) = good.outputs["embedding_keys"]
        assert len(embedding_keys) == 5 and embedding_keys[0] == keys.embedding_key(
            tiny_sam.encoder_id, image_id, (0, 0, 40, 24))
        assert StoredEmbedding.from_bytes(local_store.get(embedding_keys[0])).original_size == (24, 40)

        # each bad message -> failure outcome with reason and gRPC code name; no retry, no crash
        for args, code, phrase in [
            ((["in/missing.png"], 0, 0.3), "NOT_FOUND", "in/missing.png"),
            ((["in/empty.png"], 0, 0.3), "INVALID_ARGUMENT", "image 0 (key 'in/empty.png') is empty"),
            ((["in/a.png"], 9, 0.3), "INVALID_ARGUMENT", "crop_n_layers must be in [0, 3]"),
            ((["in/a.png"], "x", 0.3), "INVALID_ARGUMENT", "crop_n_layers must be an integer"),
            (("in/a.png", 0, 0.3), "INVALID_ARGUMENT", "image_keys must be a list"),
            (([], 0, 0.3), "INVALID_ARGUMENT", "no images"),
        ]:
            bad = _run(app, *args)
            assert (bad.ok, bad.code) == (False, code) and phrase in bad.reason, bad

        assert _run(app, ["in/a.png"], 0, 0.3).ok  # the same worker still embeds


@pytest.mark.slow
def test_storage_outage_is_retried_not_failed(broker, tiny_sam):
    with s3_server() as endpoint:
        store = MinioStore(endpoint, S3_KEY, S3_SECRET, bucket="outage")
        store.put("in/a.png", png())
    # The S3 server is gone: reading the image raises TransientError -> Celery retries with backoff.
    app = _app(broker)
    register_tasks(app, lambda: EmbedderCore(tiny_sam, store, batch_size=1, max_pixels=10**6))
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["embedder"], shutdown_timeout=30):
        result = app.send_task(TASK_NAME, args=[["in/a.png"], 0, 0.3])
        deadline = time.monotonic() + 60
        while result.state != "RETRY" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.state == "RETRY"
        assert "object store unavailable: reading 'in/a.png' in bucket 'outage'" in str(result.info)
        result.revoke()


@pytest.mark.slow
def test_celery_worker_process_survives_bad_input(broker, s3_endpoint, tiny_checkpoint, minio_store, tmp_path):
    env = {**os.environ, "DATAENGINE_STORE": "minio", "DATAENGINE_MINIO_ENDPOINT": s3_endpoint,
           "DATAENGINE_MINIO_ACCESS_KEY": S3_KEY, "DATAENGINE_MINIO_SECRET_KEY": S3_SECRET,
           "DATAENGINE_BUCKET": minio_store.bucket, "DATAENGINE_BROKER_URL": broker,
           "DATAENGINE_MODEL_TYPE": "tiny", "DATAENGINE_CHECKPOINT": str(tiny_checkpoint)}
    minio_store.put("in/good.png", png(24, 40))
    minio_store.put("in/truncated.png", BAD_IMAGES["truncated_png"][0])
    app = _app(broker)
    with celery_worker("embedder", env, tmp_path / "worker.log") as worker:
        bad = _run(app, ["in/truncated.png"], 0, 0.3, timeout=120)
        assert not bad.ok and bad.code == "INVALID_ARGUMENT" and "truncated" in bad.reason
        good = _run(app, ["in/good.png"], 0, 0.3)
        assert good.ok, good.reason
        assert minio_store.exists(good.outputs["embedding_keys"][0][0])
        assert worker.poll() is None  # the same worker process served both
