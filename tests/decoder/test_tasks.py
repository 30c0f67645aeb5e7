"""Celery task ``decoder.generate_masks`` on a real Redis broker and real workers: bad input is a
failure outcome with its reason and the worker goes on; storage trouble is retried."""

from __future__ import annotations

import json
import os
import time

import pytest
from celery.contrib.testing.worker import start_worker

from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.common.storage import LocalStore, MinioStore
from services.decoder.core import DecoderCore
from services.decoder.tasks import register_tasks
from tests.conftest import S3_KEY, S3_SECRET
from tests.decoder.builders import blob_image, embed, put
from tests.servers import celery_worker, s3_server

TASK = "decoder.generate_masks"
PASS_ALL = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
def _run(app, *args, timeout: float = 60) -> TaskOutcome:
    return TaskOutcome.from_json(app.send_task(TASK, args=list(args)).get(timeout=timeout))


BAD_MESSAGES = [
    # (args, code, phrase in the reason)
    (("embeddings/nope/img/0_0_1_1.npz", PASS_ALL), "NOT_FOUND", "embeddings/nope/img/0_0_1_1.npz"),
    (("{key}", {"points_per_side": 0}), "INVALID_ARGUMENT", "points_per_side must be in"),
    (("{key}", {"points_per_sid": 4}), "INVALID_ARGUMENT", "points_per_sid"),
    (("{key}", [4]), "INVALID_ARGUMENT", "params must be a JSON object"),
    ((7, PASS_ALL), "INVALID_ARGUMENT", "embedding_key must be a string"),
    (("{key}", {"crop_n_layers": 1}), "FAILED_PRECONDITION", "crop_n_layers=1"),
]


def test_outcomes_on_an_in_process_worker(broker, tiny_sam, local_store):
    key = put(local_store, embed(tiny_sam, blob_image(40, 56), "img2"))
    app = create_celery(Settings(broker_url=broker))
    register_tasks(app, lambda: DecoderCore(tiny_sam, local_store, cache_size=2))
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["decoder"]):
        for (embedding_key, params), code, phrase in BAD_MESSAGES:
            embedding_key = key if embedding_key == "{key}" else embedding_key
            bad = _run(app, embedding_key, params)
            assert (bad.ok, bad.code) == (False, code) and phrase in bad.reason, bad

        good = _run(app, key, PASS_ALL)  # the same worker still generates
        assert good.ok, good.reason
        document = json.loads(local_store.get(good.outputs["masks_key"]))
        assert len(document["annotations"]) == good.outputs["count"] > 0
        assert document["image"]["image_id"] == good.outputs["image_id"] == "img2"


@pytest.mark.slow
def test_storage_outage_is_retried_not_failed(broker, tiny_sam):
    with s3_server() as endpoint:
        store = MinioStore(endpoint, S3_KEY, S3_SECRET, bucket="outage")
        key = put(store, embed(tiny_sam, blob_image(40, 56), "img3"))
    # The S3 server is gone: reading the embedding raises TransientError -> Celery retries.
    app = create_celery(Settings(broker_url=broker))
    register_tasks(app, lambda: DecoderCore(tiny_sam, store, cache_size=2))
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["decoder"], shutdown_timeout=30):
        result = app.send_task(TASK, args=[key, PASS_ALL])
        deadline = time.monotonic() + 60
        while result.state != "RETRY" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert result.state == "RETRY"
        assert key in str(result.info)
        result.revoke()


@pytest.mark.slow
def test_celery_worker_process_survives_bad_input(broker, tiny_checkpoint, tiny_sam, tmp_path):
    store = LocalStore(tmp_path / "store" / "dataengine")
    key = put(store, embed(tiny_sam, blob_image(40, 56), "img4"))
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
           "DATAENGINE_BUCKET": "dataengine", "DATAENGINE_BROKER_URL": broker,
           "DATAENGINE_MODEL_TYPE": "tiny", "DATAENGINE_CHECKPOINT": str(tiny_checkpoint)}
    app = create_celery(Settings(broker_url=broker))
    with celery_worker("decoder", env, tmp_path / "worker.log") as worker:
        bad = _run(app, key, {"points_per_side": -3}, timeout=120)
        assert not bad.ok and bad.code == "INVALID_ARGUMENT" and "points_per_side" in bad.reason
        missing = _run(app, "embeddings/x/y/0_0_1_1.npz", PASS_ALL)
        assert not missing.ok and missing.code == "NOT_FOUND" and "embeddings/x/y/0_0_1_1.npz" in missing.reason
        good = _run(app, key, PASS_ALL)
        assert good.ok, good.reason
        assert store.exists(good.outputs["masks_key"])
        assert worker.poll() is None  # the same worker process served all three
