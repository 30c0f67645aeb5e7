"""A full or unavailable store never fails a good item (issue 29): a step meeting one retries with
the capped backoff for as long as it lasts, past ``max_attempts`` and without a dead letter, on the
Celery step task and in the in-process dispatcher; a report whose manifest cannot be written is
applied once it can; Submit answers RESOURCE_EXHAUSTED / UNAVAILABLE naming the cause and the key.
The disk is full by injection at the store's boundary (every CI) and, where the test may mount
one, as a real tmpfs filled during the run."""

from __future__ import annotations

import errno
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from services.app.embedded import EmbeddedEngine
from services.common.errors import StorageFull, TransientError
from services.common.image_source import ImageSource
from services.common.pb import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from services.common.queues import create_celery
from services.common.settings import Settings
from services.common.steps import REPORT_TASK, StepReport, register_step_task, run_step
from services.orchestrator.model import EMBED, VERIFY, ItemState
from services.orchestrator.servicer import add_to_server
from services.orchestrator.tasks import register_tasks
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.full_disk import faults, fill, full_disk, tmpfs  # noqa: F401 - full_disk: a fixture
from tests.orchestrator.test_engine import GRID, ScriptedVerifier
from tests.servers import grpc_loopback

MAX_ATTEMPTS = 1  # a store fault is retried past it: one refusal more shows that
SETTLED = {ItemState.ACCEPTED, ItemState.REVIEW, ItemState.REJECTED}


def png(seed: int, h: int = 40, w: int = 56) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_engine(out, tiny_sam, sleeps: list[float]) -> EmbeddedEngine:
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID, concepts_backend="labels",
                                     max_attempts=MAX_ATTEMPTS), out, sam=tiny_sam)
    engine.dispatcher.sleep = sleeps.append  # the backoff, recorded instead of waited
    engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(
        VerifierCore(ScriptedVerifier({"dog": 0.95}), engine.store), engine.store)
    return engine


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def engine(tmp_path, tiny_sam, sleeps) -> EmbeddedEngine:
    return make_engine(tmp_path / "out", tiny_sam, sleeps)


def submit(engine: EmbeddedEngine, n: int) -> list[str]:
    return engine.orchestrator.submit([ImageSource(data=png(i), filename=f"im{i}.png") for i in range(n)], ["dog"])


def assert_all_settled_none_failed(engine: EmbeddedEngine, ids: list[str]) -> None:
    for item_id in ids:
        item = engine.orchestrator.load(item_id)
        assert item.state in SETTLED, (item.state, item.reason)
    assert engine.orchestrator.stats().dead_letters == 0


# -- a step's attempt, and the Celery step task ------------------------------------------------------

def test_run_step_raises_a_full_disk_for_a_retry_instead_of_failing_the_item(engine, full_disk):
    submit(engine, 1)
    embed = engine.dispatcher.queue.popleft()
    disk = full_disk(engine.store.root, {"embeddings/": 1})
    with pytest.raises(StorageFull, match=r"writing 'embeddings/.*ENOSPC"):
        run_step(engine.dispatcher.handlers[EMBED], embed)  # not an INTERNAL "step crashed" outcome
    assert disk.refused and disk.left == 0
    assert run_step(engine.dispatcher.handlers[EMBED], embed).ok


def test_the_celery_step_task_retries_a_full_disk_past_max_attempts_and_reports_success(engine, full_disk,
                                                                                         monkeypatch):
    app = create_celery(Settings())
    register_step_task(app, "embedder", lambda: engine.dispatcher.handlers[EMBED], MAX_ATTEMPTS)
    register_tasks(app, lambda: engine.orchestrator, MAX_ATTEMPTS)
    sent: list[dict] = []
    monkeypatch.setattr(app, "send_task", lambda name, args, **kw: sent.append(args[0]) if name == REPORT_TASK
                        else None)  # the reports, caught on their way to the broker
    (item_id,) = submit(engine, 1)
    embed = engine.dispatcher.queue.popleft()

    full = faults("full")
    disk = full_disk(engine.store.root, {"embeddings/": 2 * MAX_ATTEMPTS})
    app.tasks["embedder.step"].apply(args=[embed.to_json()])  # eager: each retry runs at once
    (report,) = map(StepReport.from_json, sent)
    assert report.outcome.ok and not report.dead_letter and report.attempts == 2 * MAX_ATTEMPTS + 1
    assert disk.left == 0 and faults("full") == full + 2 * MAX_ATTEMPTS

    # the orchestrator cannot write the manifest either: orchestrator.report retries, then applies
    disk = full_disk(engine.store.root, {"items/": 2 * MAX_ATTEMPTS})
    app.tasks[REPORT_TASK].apply(args=[report.to_json()])
    item = engine.orchestrator.load(item_id)
    assert disk.left == 0 and item.state == ItemState.EMBEDDED and item.done == [EMBED]
    assert engine.orchestrator.stats().dead_letters == 0

    def unreachable(request):  # other transient trouble still gives up after max_attempts
        raise TransientError("model endpoint: connection refused")

    register_step_task(app, "concepts", lambda: unreachable, MAX_ATTEMPTS)
    app.tasks["concepts.step"].apply(args=[engine.dispatcher.queue.popleft().to_json()])
    assert StepReport.from_json(sent[-1]).dead_letter


# -- the in-process engine -------------------------------------------------------------------------

def test_a_disk_full_for_the_first_writes_of_steps_and_reports_fails_no_item(engine, full_disk, sleeps):
    ids = submit(engine, 1)  # one item: each refusal reruns a step's model work (seconds on a CPU)
    full = faults("full")
    # embed: more refused writes than MAX_ATTEMPTS; then 2 manifests and a decode output
    disk = full_disk(engine.store.root, {"embeddings/": MAX_ATTEMPTS + 1, "items/": 2, "masks/": 1})
    engine.dispatcher.run(engine.orchestrator.report)
    assert disk.left == 0 and faults("full") == full + MAX_ATTEMPTS + 4
    assert_all_settled_none_failed(engine, ids)
    assert max(sleeps) <= 60 and len(sleeps) == MAX_ATTEMPTS + 4  # one capped backoff per refusal


def test_a_real_full_filesystem_during_a_run_fails_no_item(tmp_path, tiny_sam, sleeps):
    with tmpfs(tmp_path / "fs", "16m") as fs:
        engine = make_engine(fs / "out", tiny_sam, sleeps)
        ids = submit(engine, 1)
        ballast = fill(fs)  # the disk fills up after the Submit

        def wait(seconds: float) -> None:  # an operator frees space during the third backoff
            sleeps.append(seconds)
            if len(sleeps) == 3:
                ballast.unlink()

        engine.dispatcher.sleep = wait
        engine.dispatcher.run(engine.orchestrator.report)
        assert len(sleeps) >= 3 and not ballast.exists()
        assert_all_settled_none_failed(engine, ids)


# -- gRPC Submit --------------------------------------------------------------------------------------

@pytest.mark.parametrize("err,code,prefix", [
    (errno.ENOSPC, grpc.StatusCode.RESOURCE_EXHAUSTED, "object store full"),
    (errno.EROFS, grpc.StatusCode.UNAVAILABLE, "object store unavailable"),
])
def test_submit_on_a_faulty_store_answers_a_retryable_status_naming_the_cause(engine, full_disk, err, code, prefix):
    data = png(7)
    request = pb.SubmitRequest(images=[common_pb2.ImageRef(data=data, filename="a.png")], known_labels=["dog"])
    with grpc_loopback(lambda s: add_to_server(s, engine.orchestrator), 8 << 20) as (channel, _):
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        disk = full_disk(engine.store.root, {"": 1}, err)
        with pytest.raises(grpc.RpcError) as info:
            stub.Submit(request, timeout=30)
        assert info.value.code() == code, info.value.details()
        details = info.value.details()
        assert details.startswith(f"{prefix}: writing 'images/") and errno.errorcode[err] in details
        assert disk.left == 0
        (item_id,) = stub.Submit(request, timeout=30).item_ids  # the client's retry, the store back
        item = stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=30)
    assert item.state == ItemState.INGESTED and [r.step for r in engine.dispatcher.queue][:1] == [EMBED]
