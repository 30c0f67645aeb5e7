"""The distributed engine on the real stack: redis-server, the S3 server, and each service's Celery
worker in its own process. 50 images (three of them bad) flow to settled states, each accounted
for exactly once; a decoder worker killed with SIGKILL while it holds a message loses nothing."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from contextlib import ExitStack

import numpy as np
import pytest
import redis
from PIL import Image
from pycocotools.coco import COCO

from services.common.settings import Settings
from services.orchestrator import exports
from services.common.image_source import ImageSource
from services.orchestrator.model import STEPS, SETTLED, ItemState
from services.app.serve import SERVICES
from tests.conftest import S3_KEY, S3_SECRET
from tests.servers import celery_worker, start_celery_worker, stop_worker

pytestmark = pytest.mark.slow

GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
N_GOOD = 47


def png(rng, h: int, w: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def bad_images(rng) -> dict[str, bytes]:
    good = png(rng, 32, 32)
    return {"garbage.png": b"this is not an image at all", "truncated.png": good[: len(good) // 2],
            "header-only.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 10}


def decoder_holds_a_message(client: redis.Redis) -> str | None:
    """The delivery tag of a message delivered to a decoder worker and not yet acknowledged."""
    for tag, raw in client.hgetall("unacked").items():
        if json.loads(raw)[2] == "decoder":
            return tag.decode()
    return None


def wait_until(check, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_fifty_images_through_separate_workers_survive_a_sigkill(broker, s3_endpoint, minio_store,
                                                                  tiny_checkpoint, tmp_path, monkeypatch):
    env = {**os.environ, "DATAENGINE_STORE": "minio", "DATAENGINE_MINIO_ENDPOINT": s3_endpoint,
           "DATAENGINE_MINIO_ACCESS_KEY": S3_KEY, "DATAENGINE_MINIO_SECRET_KEY": S3_SECRET,
           "DATAENGINE_BUCKET": minio_store.bucket, "DATAENGINE_BROKER_URL": broker,
           "DATAENGINE_MODEL_TYPE": "tiny", "DATAENGINE_CHECKPOINT": str(tiny_checkpoint),
           "DATAENGINE_AMG_PARAMS": json.dumps(GRID), "DATAENGINE_VISIBILITY_TIMEOUT_S": "4",
           "DATAENGINE_EMBED_BATCH_SIZE": "1"}
    for name, value in env.items():  # the test process reads the same settings as the workers
        if name.startswith("DATAENGINE_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    orchestrator = SERVICES["orchestrator"]().make_core(settings)
    client = redis.Redis.from_url(broker)
    rng = np.random.default_rng(7)
    files = {f"img{i:02d}.png": png(rng, 24 + i % 5 * 4, 32 + i % 3 * 8) for i in range(N_GOOD)}
    files.update(bad_images(rng))

    with ExitStack() as stack:
        for service in ("embedder", "concepts", "verifier", "orchestrator"):
            stack.enter_context(celery_worker(service, env, tmp_path / f"{service}.log"))
        killed_log = open(tmp_path / "decoder-killed.log", "wb")
        doomed = start_celery_worker("decoder", env, killed_log)
        try:
            ids = orchestrator.submit([ImageSource(data=data, filename=name) for name, data in files.items()],
                                      ["dog", "frisbee"])
            assert len(set(ids)) == len(files) == 50
            # SIGKILL the decoder while a message is delivered to it and unacknowledged
            tag = wait_until(lambda: decoder_holds_a_message(client), 120, "the decoder to take a message")
            os.kill(doomed.pid, signal.SIGKILL)
            assert doomed.wait(timeout=10) == -signal.SIGKILL
        finally:
            if doomed.poll() is None:
                stop_worker(doomed)
            killed_log.close()
        assert client.hexists("unacked", tag), "the killed worker cannot have acknowledged it"
        stack.enter_context(celery_worker("decoder", env, tmp_path / "decoder.log"))

        def all_settled():
            by_state, _ = orchestrator.index.counts()
            return sum(n for s, n in by_state.items() if ItemState[s.upper()] in SETTLED) == 50

        try:
            wait_until(all_settled, 240, "all 50 items to settle", poll=0.5)
        except AssertionError:
            logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
            raise AssertionError(f"{orchestrator.index.counts()}\n{logs}") from None
        assert not client.hexists("unacked", tag), "the killed worker's message was redelivered and acknowledged"

    # every image accounted for exactly once, from the manifests (the source of truth)
    items = [orchestrator.load(i) for i in ids]
    assert sorted(i.source for i in items) == sorted(files)
    failed = {i.source: i.reason for i in items if i.state == ItemState.FAILED}
    assert set(failed) == set(bad_images(rng)), failed
    # embedding and proposal run side by side and both read the image: whichever fails first says why
    assert all(r.startswith(("embed:", "propose:")) and "image" in r for r in failed.values()), failed
    for item in items:
        if item.state != ItemState.FAILED:
            assert sorted(item.done) == sorted(STEPS), item.done  # each step applied once
            assert [h[0] for h in item.history].count(item.state.name) == 1
            assert {p.phrase for p in item.phrases if not p.is_negative} == {"dog", "frisbee"}
            negatives = {p.phrase for p in item.phrases if p.is_negative}  # from the ontology backend
            assert len(negatives) >= 5 and not negatives & {"dog", "frisbee", "animal", "toy"}
    by_state, by_stage = orchestrator.index.counts()
    assert sum(by_state.values()) == 50 and by_stage == {"fully_automatic": 50}
    assert orchestrator.stats().dead_letters == 0
    assert all(n == 0 for n in orchestrator.stats().queue_depths.values())

    # the exports load with pycocotools
    coco_path = tmp_path / "coco.json"
    summary = exports.export(orchestrator.store, "coco", coco_path, exports.DATASET_STATES)
    coco = COCO(str(coco_path))
    assert len(coco.getImgIds()) == summary.images == N_GOOD
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"dog", "frisbee"}
    exports.export(orchestrator.store, "saco", tmp_path / "saco.json", exports.DATASET_STATES)
    saco = json.loads((tmp_path / "saco.json").read_text())
    assert sum(not p["is_negative"] for p in saco["pairs"]) == 2 * N_GOOD


def test_a_lost_step_message_is_sent_again_by_the_engine_within_30_s(broker, tmp_path, tiny_checkpoint,
                                                                     monkeypatch):
    """No operator: the embed messages are deleted from Redis before any embedder runs; the
    orchestrator worker's sweep finds them neither queued, held nor reported and sends them again,
    and the embedder's reports are applied. The propose messages, queued all along (no concepts
    worker runs), are left alone."""
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
           "DATAENGINE_BROKER_URL": broker, "DATAENGINE_MODEL_TYPE": "tiny",
           "DATAENGINE_CHECKPOINT": str(tiny_checkpoint), "DATAENGINE_AMG_PARAMS": json.dumps(GRID),
           "DATAENGINE_SWEEP_INTERVAL_S": "2", "DATAENGINE_STEP_GRACE_S": "5"}
    for name, value in env.items():
        if name.startswith("DATAENGINE_"):
            monkeypatch.setenv(name, value)
    orchestrator = SERVICES["orchestrator"]().make_core(Settings())
    client = redis.Redis.from_url(broker)
    rng = np.random.default_rng(3)
    with ExitStack() as stack:
        stack.enter_context(celery_worker("orchestrator", env, tmp_path / "orchestrator.log"))
        ids = orchestrator.submit([ImageSource(data=png(rng, 24, 32), filename=f"{i}.png") for i in range(3)],
                                  ["dog"])
        assert client.llen("embedder") == 3 and client.llen("concepts") == 3
        client.delete("embedder")  # lost: no worker took them, nothing will redeliver them
        lost_at = time.monotonic()
        stack.enter_context(celery_worker("embedder", env, tmp_path / "embedder.log"))

        def embedded():
            return all("embed" in orchestrator.load(i).done for i in ids)

        try:
            wait_until(embedded, 60, "the three embed steps to be sent again and reported", poll=0.2)
        except AssertionError:
            logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
            raise AssertionError(f"{orchestrator.index.counts()}\n{logs}") from None
        recovered_after = time.monotonic() - lost_at
    assert recovered_after < 30, recovered_after
    assert client.llen("concepts") == 3  # queued steps are never sent twice
    assert orchestrator.index.counts()[0] == {"embedded": 3}
    assert "step lost: sent again" in (tmp_path / "orchestrator.log").read_text()
