"""`dataengine reconcile` after Redis lost its data: the indices come back from the manifests in the
object store and every unfinished item's pending steps are queued again (real Redis, no workers)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import redis
from PIL import Image
from typer.testing import CliRunner

from services.app.cli import app
from services.common.settings import Settings
from services.common.image_source import ImageSource
from services.orchestrator.model import ItemState
from services.app.serve import SERVICES


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def env(broker, tmp_path, monkeypatch) -> Settings:
    for name, value in {"DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
                        "DATAENGINE_BROKER_URL": broker}.items():
        monkeypatch.setenv(name, value)
    return Settings()


def test_reconcile_rebuilds_indices_and_requeues_unfinished_items(env):
    orchestrator = SERVICES["orchestrator"]().make_core(env)
    ids = orchestrator.submit([ImageSource(data=png(i), filename=f"{i}.png") for i in range(3)], ["dog"])
    # one item settled by a human before the crash: it must not be queued again
    done = orchestrator.load(ids[0])
    done.move(ItemState.FAILED, "bad image")
    orchestrator.save(done)
    assert orchestrator.queue_depths() == {"embedder": 3, "decoder": 0, "concepts": 3, "verifier": 0,
                                           "orchestrator": 0}

    redis.Redis.from_url(env.broker_url).flushdb()  # Redis lost everything: queues and indices
    assert orchestrator.index.counts() == ({}, {})

    result = CliRunner().invoke(app, ["reconcile"])
    assert result.exit_code == 0, result.output
    assert "re-enqueued 2 unfinished items" in result.output
    by_state, by_stage = orchestrator.index.counts()
    assert by_state == {"ingested": 2, "failed": 1} and by_stage == {"fully_automatic": 3}
    depths = orchestrator.queue_depths()
    assert depths["embedder"] == 2 and depths["concepts"] == 2  # the failed item is not requeued


def test_reconcile_names_an_unreachable_redis(env, monkeypatch):
    monkeypatch.setenv("DATAENGINE_BROKER_URL", "redis://127.0.0.1:1/0")
    result = CliRunner().invoke(app, ["reconcile"])
    assert result.exit_code == 1 and "redis" in result.output.lower()


def test_reconcile_split_across_worker_processes_rebuilds_the_same_index(env):
    orchestrator = SERVICES["orchestrator"]().make_core(env)
    ids = orchestrator.submit([ImageSource(data=png(i), filename=f"{i}.png") for i in range(8)], ["dog"])
    for item_id in ids[:3]:  # settled before the crash: counted, not requeued
        item = orchestrator.load(item_id)
        item.move(ItemState.FAILED, "bad image")
        orchestrator.save(item)
    redis.Redis.from_url(env.broker_url).flushdb()

    result = CliRunner().invoke(app, ["reconcile", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "re-enqueued 5 unfinished items" in result.output
    assert orchestrator.index.counts() == ({"ingested": 5, "failed": 3}, {"fully_automatic": 8})
    depths = orchestrator.queue_depths()
    assert depths["embedder"] == 5 and depths["concepts"] == 5  # each item once, whichever part had it
    bad = CliRunner().invoke(app, ["reconcile", "--workers", "0"])
    assert bad.exit_code != 0 and "--workers must be at least 1, got 0" in bad.output
