"""The self-healing sweep against real kombu messages on a real redis-server: a step whose message
the test deletes is sent again, with the same request, without a reconcile; a queued or held step
is left alone; a step whose report is lost is sent again; a retried Submit after the index write
was cut completes the first."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from services.common.image_source import ImageSource
from services.common.queues import create_celery
from services.common.settings import Settings
from services.common.steps import StepReport, StepRequest
from services.common.queues import TaskOutcome
from services.common.storage import LocalStore
from services.orchestrator.dispatch import CeleryDispatcher
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import RedisIndex
from services.orchestrator.model import ItemState
from services.orchestrator.sweep import QueueProbe, Sweep
from tests.orchestrator.test_servicer import png


def setup(broker: str, tmp_path):
    orch = Orchestrator(LocalStore(tmp_path / "bucket"), RedisIndex(broker),
                        CeleryDispatcher(create_celery(Settings(broker_url=broker))))
    clock = [time.time()]
    sweep = Sweep(orch, QueueProbe(broker), grace_s=15.0, deadline_s=600.0, clock=lambda: clock[0])
    return orch, sweep, clock, redis.Redis.from_url(broker)


def queued(client, queue: str) -> list[dict]:
    """The step requests waiting in ``queue``, oldest first (kombu: LPUSH, BRPOP)."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["dataengine_step"] in ("embed", "propose")  # the sweep reads these
        out.append(json.loads(base64.b64decode(message["body"]))[0][0])
    return out


def test_a_deleted_step_message_is_sent_again_and_a_queued_one_is_not(broker, tmp_path):
    orch, sweep, clock, client = setup(broker, tmp_path)
    (item_id,) = orch.submit([ImageSource(data=png(1), filename="a.png")], ["dog"])
    (embed,) = queued(client, "embedder")
    assert embed["item_id"] == item_id and len(queued(client, "concepts")) == 1

    assert sweep.run_once().resent == []  # within the grace: nothing is due
    clock[0] += 60
    assert sweep.run_once().resent == []  # both still queued: left alone, however old

    client.delete("embedder")  # the embed message is lost (a Redis restart without persistence)
    result = sweep.run_once()
    assert result.resent == [(item_id, "embed")]
    (again,) = queued(client, "embedder")
    assert {k: v for k, v in again.items() if k != "sent_at"} == {k: v for k, v in embed.items() if k != "sent_at"}
    assert len(queued(client, "concepts")) == 1  # the propose message was not touched
    assert sweep.run_once().resent == []  # sent again just now: within the grace once more
    assert orch.load(item_id).state == ItemState.INGESTED  # nothing else changed


def test_a_held_step_waits_and_a_lost_report_is_sent_again(broker, tmp_path):
    orch, sweep, clock, client = setup(broker, tmp_path)
    (item_id,) = orch.submit([ImageSource(data=png(2), filename="b.png")], ["dog"])
    # A worker takes the propose message and holds it unacknowledged, as kombu does with acks_late.
    raw = client.rpop("concepts")
    client.hset("unacked", "tag-1", json.dumps([json.loads(raw), "", "concepts"]))
    client.zadd("unacked_index", {"tag-1": clock[0]})
    # The embed worker wrote its output but died before its report reached the orchestrator.
    client.delete("embedder")
    clock[0] += 60
    result = sweep.run_once()
    assert result.resent == [(item_id, "embed")] and result.waiting == 1  # propose is held: it waits
    clock[0] += 601  # held longer than the deadline: a hung worker; sent again too
    client.delete("embedder")
    assert sweep.run_once().resent == [(item_id, "embed"), (item_id, "propose")]
    assert len(queued(client, "concepts")) == 1  # the propose message is queued again


def test_an_unreadable_manifest_is_skipped_and_the_rest_of_the_sweep_goes_on(broker, tmp_path):
    orch, sweep, clock, client = setup(broker, tmp_path)
    bad, good = orch.submit([ImageSource(data=png(5), filename="e.png"), ImageSource(data=png(6), filename="f.png")],
                            ["dog"])
    orch.store.put(f"items/{bad}/manifest.json", b"{not json")
    client.delete("embedder")
    clock[0] += 60
    result = sweep.run_once()
    assert result.resent == [(good, "embed")] and result.dropped == 1
    assert orch.index.tracked(bad, "embed") is None  # forgotten, not retried every round


def test_an_applied_report_ends_the_tracking(broker, tmp_path):
    orch, sweep, clock, client = setup(broker, tmp_path)
    (item_id,) = orch.submit([ImageSource(data=png(3), filename="c.png")], ["dog"])
    assert orch.index.tracked(item_id, "embed") is not None
    outputs = {"embedding_key": "embeddings/m/x/0_0_56_40.npz", "image_id": "x", "height": 40, "width": 56}
    orch.report(StepReport(item_id, "embed", TaskOutcome(ok=True, outputs=outputs)))
    assert orch.index.tracked(item_id, "embed") is None
    client.delete("embedder", "concepts")
    clock[0] += 60
    assert sweep.run_once().resent == [(item_id, "propose")]  # only what is still pending


def test_a_retried_submit_completes_what_the_first_left_undone(broker, tmp_path):
    orch, _, _, client = setup(broker, tmp_path)
    (item_id,) = orch.submit([ImageSource(data=png(4), filename="d.png")], ["dog"])
    # Redis cut the first Submit off after its manifest: no index entry, no message, nothing tracked.
    orch.index.clear()
    client.delete("embedder", "concepts")
    assert orch.index.counts() == ({}, {})
    assert orch.submit([ImageSource(data=png(4), filename="d.png")], ["dog"]) == [item_id]
    assert orch.index.counts()[0] == {"ingested": 1}
    assert [r["item_id"] for r in queued(client, "embedder")] == [item_id]
    assert [r["item_id"] for r in queued(client, "concepts")] == [item_id]
    # A third Submit, with the steps in flight, sends nothing more.
    orch.submit([ImageSource(data=png(4), filename="d.png")], ["dog"])
    assert len(queued(client, "embedder")) == 1 and len(queued(client, "concepts")) == 1
    assert StepRequest.from_json(queued(client, "embedder")[0]).sent_at > 0


@pytest.mark.slow  # redis-py tries each connection for ~6 s before the broker counts as away
def test_with_the_broker_away_a_retry_or_a_report_is_dropped_in_one_log_line(caplog):
    """A Redis restart: Celery cannot queue the retry (it raises Reject) nor the report; both are
    said in one warning, no traceback, and the sweep heals the step later."""
    from services.common.steps import StepReport, retry_later, send_report
    from tests.servers import free_port

    app = create_celery(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))  # nothing listens
    app.conf.update(task_publish_retry=False, result_backend=None, task_send_sent_event=False)

    @app.task(bind=True, shared=False, name="test.retry")
    def step(self):
        return None

    step.push_request(id="t1", retries=0, is_eager=False, called_directly=False, delivery_info={}, headers={})
    try:
        with caplog.at_level("WARNING"):
            assert retry_later(step, RuntimeError("store away"), 1) is None  # no Retry, no Reject escapes
    finally:
        step.pop_request()
    report = StepReport("item", "embed", TaskOutcome(ok=True, outputs={}))
    slept = []
    with caplog.at_level("WARNING"):
        assert send_report(app, report, 1.0, attempts=1, sleep=slept.append) is False
    assert slept == []  # one attempt, no backoff: each attempt against a dead broker costs ~6 s here
    messages = [r.getMessage() for r in caplog.records]
    assert any("retry not queued" in m and "sweep sends the step again" in m for m in messages)
    assert any("report of embed item not sent after 1 attempts" in m for m in messages)
    assert all(r.exc_info is None for r in caplog.records)
