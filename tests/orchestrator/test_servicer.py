"""The ``dataengine.v1.Orchestrator`` gRPC service over loopback, on the embedded engine's
orchestrator (tiny SAM, local store, in-memory index, in-process step queue that each test runs
explicitly after submitting): Submit, GetItem, ListItems, Stats and Export (the review RPCs:
test_review.py), every bad request answered with its status code and a message naming the problem; and the
``submit``, ``status`` and ``export`` commands of the CLI against that server and store."""

from __future__ import annotations

import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.app.cli import app as cli_app
from services.common.errors import TransientError
from services.common.keys import sha256_hex
from services.common.pb import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc
from services.common.queues import create_celery
from services.common.settings import Settings
from services.app.embedded import STORE_DIR, EmbeddedEngine
from services.orchestrator.index import queue_depths
from services.orchestrator.model import PROPOSE, VERIFY, ItemState, Stage, item_id_for
from services.orchestrator.servicer import add_to_server
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.orchestrator.test_engine import GRID, ScriptedVerifier
from tests.servers import free_port, grpc_loopback

MAX_MESSAGE = 8 << 20
S, G = ItemState, Stage
Code = grpc.StatusCode
# The verifier's judgement per phrase (random weights cannot give one): the item score is the
# minimum over its positive phrases, so ["dog"] is accepted, ["cat"] rejected, ["bird"] reviewed.
SCORES = {"dog": 0.95, "cat": 0.5, "bird": 0.8, "flaky": 1.0}
SETTLED = {S.ACCEPTED, S.REVIEW, S.REJECTED}


def png(seed: int, h: int = 40, w: int = 56) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def inline(data: bytes, filename: str = "") -> common_pb2.ImageRef:
    return common_pb2.ImageRef(data=data, filename=filename)


@pytest.fixture
def engine(tmp_path, tiny_sam) -> EmbeddedEngine:
    # the labels backend: the scripted verifier scores known phrases only
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID, concepts_backend="labels"), tmp_path / "out",
                            sam=tiny_sam)
    engine.dispatcher.sleep = lambda s: None  # retry backoff without waiting
    engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(
        VerifierCore(ScriptedVerifier(SCORES), engine.store), engine.store)
    return engine


@pytest.fixture
def server(engine):
    """(stub, "127.0.0.1:PORT") of the Orchestrator service on the engine's orchestrator."""
    with grpc_loopback(lambda s: add_to_server(s, engine.orchestrator), MAX_MESSAGE) as (channel, address):
        yield orchestrator_pb2_grpc.OrchestratorStub(channel), address


@pytest.fixture
def stub(server) -> orchestrator_pb2_grpc.OrchestratorStub:
    return server[0]


def run(engine: EmbeddedEngine) -> int:
    """Run every queued step (and those they cause) to the end; returns how many ran."""
    return engine.dispatcher.run(engine.orchestrator.report)


def rpc_error(method, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=30)
    return info.value


def submit(stub, *images, labels=(), stage=G.UNSPECIFIED) -> list[str]:
    return list(stub.Submit(pb.SubmitRequest(images=list(images), known_labels=list(labels), stage=int(stage)),
                            timeout=30).item_ids)


def get(stub, item_id: str) -> pb.Item:
    return stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=30)


def stats(stub) -> tuple[dict, dict, dict, int]:
    reply = stub.Stats(pb.StatsRequest(), timeout=30)
    for counts in (reply.items_by_state, reply.items_by_stage, reply.queue_depths):
        assert [c.key for c in counts] == sorted(c.key for c in counts)  # a stable order for clients
    return ({c.key: c.count for c in reply.items_by_state}, {c.key: c.count for c in reply.items_by_stage},
            {c.key: c.count for c in reply.queue_depths}, reply.dead_letters)


# -- Submit and GetItem ---------------------------------------------------------------------------

def test_submit_inline_images_returns_ids_in_order_and_the_items_settle(engine, stub):
    a, b = png(1), png(2, 44, 48)
    ids = submit(stub, inline(a, "a.png"), inline(b, "b.png"), labels=["dog", "bird"])
    assert ids == [item_id_for("a.png", sha256_hex(a)), item_id_for("b.png", sha256_hex(b))]
    waiting = get(stub, ids[0])
    assert waiting.state == S.INGESTED and waiting.source == "a.png" and waiting.stage == G.FULLY_AUTOMATIC

    assert run(engine) == 8  # embed, propose, decode, verify for each
    for item_id, source in zip(ids, ("a.png", "b.png")):
        item = get(stub, item_id)
        assert item.item_id == item_id and item.source == source
        assert item.state == S.REVIEW, item.reason  # min(dog 0.95, bird 0.8) needs a human check
        assert item.score == pytest.approx(0.8) and "needs a human check" in item.reason
        assert {p.phrase: p.state for p in item.phrases} == {"dog": S.ACCEPTED, "bird": S.REVIEW}
        assert all(not p.is_negative and p.provenance == "labels" for p in item.phrases)
        assert len(item.grid_masks) > 0  # GetItem carries the class-agnostic grid masks


def test_the_same_file_submitted_again_is_the_same_item(engine, stub):
    a = png(3)
    (first,) = submit(stub, inline(a, "a.png"), labels=["dog"])
    run(engine)
    assert get(stub, first).state == S.ACCEPTED
    assert submit(stub, inline(a, "a.png"), labels=["dog"]) == [first]
    assert run(engine) == 0  # nothing started twice
    assert stats(stub)[0] == {"accepted": 1}
    # The same bytes under another name is another item (its provenance differs); still waiting.
    (other,) = submit(stub, inline(a, "copy/a.png"), labels=["dog"])
    assert other != first and get(stub, other).state == S.INGESTED
    assert stats(stub)[0] == {"accepted": 1, "ingested": 1}


def test_submit_by_object_key(engine, stub):
    engine.store.put("uploads/cam1/c.png", png(4))
    (by_key,) = submit(stub, common_pb2.ImageRef(key="uploads/cam1/c.png"), labels=["cat"])
    assert by_key == item_id_for("uploads/cam1/c.png", "uploads/cam1/c.png")
    run(engine)
    item = get(stub, by_key)
    assert item.source == "uploads/cam1/c.png"  # no filename: the key is the provenance
    assert item.state == S.REJECTED and "below review threshold" in item.reason

    err = rpc_error(stub.Submit, pb.SubmitRequest(images=[common_pb2.ImageRef(key="uploads/missing.png")]))
    assert err.code() == Code.NOT_FOUND
    assert "image 0" in err.details() and "'uploads/missing.png' not found" in err.details()


@pytest.mark.parametrize("request_, code, message", [
    (pb.SubmitRequest(), Code.INVALID_ARGUMENT, "no images to submit"),
    (pb.SubmitRequest(images=[common_pb2.ImageRef(filename="x.png")]), Code.INVALID_ARGUMENT,
     "image 0 has neither data nor key"),
    (pb.SubmitRequest(images=[inline(png(5), "ok.png"), common_pb2.ImageRef()]), Code.INVALID_ARGUMENT,
     "image 1 has neither data nor key"),
    (pb.SubmitRequest(images=[inline(b"", "empty.png")]), Code.INVALID_ARGUMENT,
     "image 0 (empty.png) is empty (0 bytes)"),
    (pb.SubmitRequest(images=[inline(b"")]), Code.INVALID_ARGUMENT, "image 0 (inline) is empty"),
    (pb.SubmitRequest(images=[common_pb2.ImageRef(key="../secrets.png")]), Code.INVALID_ARGUMENT,
     "'..' segment"),
    (pb.SubmitRequest(images=[inline(png(5))], known_labels=["dog", "  "]), Code.INVALID_ARGUMENT,
     "known label 1 is empty"),
    (pb.SubmitRequest(images=[inline(png(5))], stage=9), Code.INVALID_ARGUMENT, "unknown stage 9"),
], ids=["no images", "neither", "second neither", "empty bytes", "empty unnamed", "escaping key",
        "blank label", "bad stage"])
def test_bad_submits_name_the_problem_and_ingest_nothing(engine, stub, request_, code, message):
    err = rpc_error(stub.Submit, request_)
    assert err.code() == code and message in err.details(), err.details()
    assert stats(stub)[:2] == ({}, {}) and not engine.dispatcher.queue


def test_a_bad_image_later_in_a_request_ingests_none_of_it(engine, stub):
    err = rpc_error(stub.Submit, pb.SubmitRequest(images=[inline(png(6), "good.png"), inline(b"", "empty.png")]))
    assert err.code() == Code.INVALID_ARGUMENT and "image 1 (empty.png)" in err.details()
    assert stats(stub)[0] == {}, "an item was ingested from a refused request"


def test_get_item_errors(stub):
    err = rpc_error(stub.GetItem, pb.GetItemRequest(item_id="0" * 24))
    assert err.code() == Code.NOT_FOUND and f"item {'0' * 24!r} not found" in err.details()
    err = rpc_error(stub.GetItem, pb.GetItemRequest())
    assert err.code() == Code.INVALID_ARGUMENT and "item_id is empty" in err.details()


@pytest.mark.parametrize("method, request_", [
    ("GetItem", pb.GetItemRequest(item_id="../../etc")),
    ("SubmitReview", pb.SubmitReviewRequest(item_id="a/b", annotator="ann")),
])
def test_unsafe_item_ids_are_invalid_arguments(stub, method, request_):
    err = rpc_error(getattr(stub, method), request_)
    assert err.code() == Code.INVALID_ARGUMENT and "bad item id" in err.details(), (err.code(), err.details())


# -- ListItems and Stats --------------------------------------------------------------------------

def test_list_items_filters_by_state_and_stage_and_pages(engine, stub):
    auto = submit(stub, *(inline(png(10 + i), f"im{i}.png") for i in range(3)), labels=["dog"])
    (manual,) = submit(stub, inline(png(20), "manual.png"), stage=G.ASSISTED_MANUAL)

    seen, token, pages = [], "", 0
    while True:
        reply = stub.ListItems(pb.ListItemsRequest(state=S.INGESTED, page_size=1, page_token=token), timeout=30)
        assert len(reply.items) == 1 and all(i.state == S.INGESTED for i in reply.items)
        seen += [i.item_id for i in reply.items]
        token, pages = reply.next_page_token, pages + 1
        if not token:
            break
    assert seen == sorted(auto + [manual]) and pages == 4

    by_stage = stub.ListItems(pb.ListItemsRequest(stage=G.ASSISTED_MANUAL), timeout=30)
    assert [i.item_id for i in by_stage.items] == [manual] and by_stage.next_page_token == ""
    both = stub.ListItems(pb.ListItemsRequest(state=S.INGESTED, stage=G.FULLY_AUTOMATIC, page_size=2), timeout=30)
    rest = stub.ListItems(pb.ListItemsRequest(state=S.INGESTED, stage=G.FULLY_AUTOMATIC, page_size=2,
                                              page_token=both.next_page_token), timeout=30)
    assert [i.item_id for i in both.items] + [i.item_id for i in rest.items] == sorted(auto)
    assert both.next_page_token and rest.next_page_token == ""

    run(engine)
    assert list(stub.ListItems(pb.ListItemsRequest(state=S.INGESTED), timeout=30).items) == []
    accepted = stub.ListItems(pb.ListItemsRequest(state=S.ACCEPTED), timeout=30)
    assert [i.item_id for i in accepted.items] == sorted(auto)
    assert all(len(i.grid_masks) == 0 for i in accepted.items)  # listings leave the masks to GetItem
    assert len(get(stub, auto[0]).grid_masks) > 0
    everything = stub.ListItems(pb.ListItemsRequest(), timeout=30)  # page_size 0: the default
    assert sorted(i.item_id for i in everything.items) == sorted(auto + [manual])


@pytest.mark.parametrize("request_, message", [
    (pb.ListItemsRequest(state=99), "unknown item state 99"),
    (pb.ListItemsRequest(page_size=1001), "page_size must be in [1, 1000], got 1001"),
    (pb.ListItemsRequest(page_size=-1), "page_size must be in [1, 1000], got -1"),
])
def test_bad_list_requests_are_invalid_arguments(stub, request_, message):
    err = rpc_error(stub.ListItems, request_)
    assert err.code() == Code.INVALID_ARGUMENT and message in err.details(), (err.code(), err.details())


@pytest.mark.parametrize("method, request_", [
    ("ListItems", pb.ListItemsRequest(stage=99)),
    ("NextReview", pb.NextReviewRequest(annotator="ann", stage=99)),
    ("SubmitReview", pb.SubmitReviewRequest(item_id="0" * 24, annotator="ann", accept=True,
                                            phrases=[pb.PhraseResult(phrase="dog", state=99)])),
])
def test_out_of_range_enum_values_are_invalid_arguments(stub, method, request_):
    err = rpc_error(getattr(stub, method), request_)
    assert err.code() == Code.INVALID_ARGUMENT, (err.code(), err.details())


def test_stats_count_items_per_state_and_stage_and_dead_letters(engine, stub):
    real_propose = engine.dispatcher.handlers[PROPOSE]

    def propose(request):  # storage trouble for one item, every attempt: a dead letter
        if "flaky" in request.inputs["known_labels"]:
            raise TransientError("object store: connection refused")
        return real_propose(request)

    engine.dispatcher.handlers[PROPOSE] = propose
    submit(stub, inline(png(30), "dog.png"), labels=["dog"])
    submit(stub, inline(png(31), "cat.png"), labels=["cat"])
    submit(stub, inline(png(32), "manual.png"), stage=G.ASSISTED_MANUAL)
    submit(stub, inline(b"not an image at all", "junk.png"), labels=["dog"])
    (flaky,) = submit(stub, inline(png(33), "flaky.png"), labels=["flaky"], stage=G.SEMI_AUTOMATIC)
    assert stats(stub) == ({"ingested": 5}, {"fully_automatic": 3, "assisted_manual": 1, "semi_automatic": 1},
                           {}, 0)

    run(engine)
    by_state, by_stage, depths, dead = stats(stub)
    assert by_state == {"accepted": 1, "rejected": 1, "review": 1, "failed": 2}
    assert by_stage == {"fully_automatic": 3, "assisted_manual": 1, "semi_automatic": 1}
    assert depths == {} and dead == 1  # this orchestrator has no Celery queues
    failed = stub.ListItems(pb.ListItemsRequest(state=S.FAILED), timeout=30).items
    reasons = {i.source: i.reason for i in failed}
    assert reasons["junk.png"].startswith("embed:") and "junk.png" in reasons["junk.png"]
    assert "gave up after 5 attempts" in reasons["flaky.png"] and get(stub, flaky).state == S.FAILED


# -- Export ---------------------------------------------------------------------------------------

def test_export_writes_the_dataset_into_the_store(engine, stub):
    (dog,) = submit(stub, inline(png(50), "dog.png"), labels=["dog"])
    (cat,) = submit(stub, inline(png(51, 48, 40), "cat.png"), labels=["cat"])
    submit(stub, inline(b"not an image", "junk.png"), labels=["dog"])  # fails: not in the dataset
    run(engine)
    assert {get(stub, dog).state, get(stub, cat).state} == {S.ACCEPTED, S.REJECTED}

    reply = stub.Export(pb.ExportRequest(format="coco", prefix="exports/run1"), timeout=30)
    assert list(reply.keys) == ["exports/run1/coco.json"] and reply.items == 2
    coco = json.loads(engine.store.get("exports/run1/coco.json"))
    assert sorted(i["file_name"] for i in coco["images"]) == ["cat.png", "dog.png"]
    assert {(i["file_name"], i["height"], i["width"]) for i in coco["images"]} == {("dog.png", 40, 56),
                                                                                  ("cat.png", 48, 40)}

    saco = stub.Export(pb.ExportRequest(format="SACO", prefix="exports/run1/"), timeout=30)
    assert list(saco.keys) == ["exports/run1/saco.json"] and saco.items == 2
    assert engine.store.exists("exports/run1/saco.json")

    sa1b = stub.Export(pb.ExportRequest(format="sa1b", prefix="exports/sa1b/"), timeout=30)
    assert sa1b.items == 2 and len(sa1b.keys) == 2
    for key in sa1b.keys:
        assert key.startswith("exports/sa1b/") and key.endswith(".json")
        doc = json.loads(engine.store.get(key))
        assert len(doc["annotations"]) > 0 and doc["image"]["height"] in (40, 48)


@pytest.mark.parametrize("request_, message", [
    (pb.ExportRequest(format="yolo", prefix="exports"), "unknown export format 'yolo'; use one of coco, sa1b, saco"),
    (pb.ExportRequest(format="coco", prefix="items/x"), "export prefix 'items/x' is outside exports/"),
    (pb.ExportRequest(format="coco", prefix="images"), "is outside exports/"),
    (pb.ExportRequest(format="coco", prefix="/exports/run1"), "is absolute"),
    (pb.ExportRequest(format="coco"), "export needs an object-store prefix"),
    (pb.ExportRequest(format="coco", prefix="a/../../b"), "'..' segment"),
])
def test_bad_exports_are_invalid_arguments(engine, stub, request_, message):
    err = rpc_error(stub.Export, request_)
    assert err.code() == Code.INVALID_ARGUMENT and message in err.details(), err.details()
    assert [k for k in engine.store.list("") if not k.startswith("items/")] == []  # nothing written


# -- the CLI against this server ------------------------------------------------------------------

runner = CliRunner()


def test_cli_status_reports_items_queues_and_dead_letters(engine, server, broker):
    stub, address = server
    # Stats' queue depths from real Celery queues on Redis (no worker takes the messages).
    engine.orchestrator.queue_depths = lambda: queue_depths(broker, ("embedder", "decoder"))
    celery = create_celery(Settings(broker_url=broker))
    for _ in range(2):
        celery.send_task("embedder.step", args=[{}], queue="embedder")
    submit(stub, inline(png(60), "m.png"), stage=G.ASSISTED_MANUAL)
    submit(stub, inline(png(61), "a.png"), labels=["dog"])
    engine.orchestrator.index.add_dead_letter({"item_id": "x", "step": "embed"})

    result = runner.invoke(cli_app, ["status", "--address", address, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "items_by_state": {"ingested": 2}, "items_by_stage": {"assisted_manual": 1, "fully_automatic": 1},
        "queue_depths": {"decoder": 0, "embedder": 2}, "dead_letters": 1,
        "review_waiting": {"review": 0, "fix": 0, "audit": 0, "stage1": 0}, "review_oldest_s": 0.0,
        "annotators": []}

    tables = runner.invoke(cli_app, ["status", "--address", address])
    assert tables.exit_code == 0, tables.output
    assert "ingested" in tables.stdout and "embedder" in tables.stdout and "dead letters: 1" in tables.stdout
    assert "review waiting" in tables.stdout and "annotators" in tables.stdout


def test_cli_submit_then_export_from_the_store(engine, server, tmp_path, monkeypatch):
    _, address = server
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    files = {folder / "a.png": png(70), folder / "sub" / "b.png": png(71, 36, 52)}
    for path, data in files.items():
        path.write_bytes(data)
    (folder / "notes.txt").write_text("not an image: skipped")

    result = runner.invoke(cli_app, ["submit", str(folder), "--label", "dog", "--address", address, "--batch", "1"])
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines == [[item_id_for(str(p), sha256_hex(d)), str(p)] for p, d in sorted(files.items())]
    cat_png = tmp_path / "cat.png"
    cat_png.write_bytes(png(72))
    again = runner.invoke(cli_app, ["submit", str(folder / "a.png"), str(cat_png), "--label", "cat",
                                    "--address", address])
    assert again.exit_code == 0, again.output
    # a.png was submitted before: the same item (its labels stay); cat.png is new.
    assert again.stdout.splitlines()[0] == "\t".join(lines[0])
    cat_id = again.stdout.splitlines()[1].split("\t")[0]

    assert run(engine) == 12
    states = {item_id: engine.orchestrator.load(item_id).state for item_id, _ in lines}
    assert states == {lines[0][0]: S.ACCEPTED, lines[1][0]: S.ACCEPTED}
    assert engine.orchestrator.load(cat_id).state == S.REJECTED

    # `export` reads the store from DATAENGINE_* settings: the engine's store is OUT/.dataengine.
    monkeypatch.setenv("DATAENGINE_STORE", "local")
    monkeypatch.setenv("DATAENGINE_STORE_ROOT", str(engine.out_dir))
    monkeypatch.setenv("DATAENGINE_BUCKET", STORE_DIR)
    out = tmp_path / "exported" / "coco.json"
    exported = runner.invoke(cli_app, ["export", "coco", "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["items"] == 3
    coco = json.loads(out.read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted([str(p) for p in files] + [str(cat_png)])

    accepted_only = runner.invoke(cli_app, ["export", "coco", "--out", str(out), "--state", "accepted"])
    assert accepted_only.exit_code == 0 and json.loads(accepted_only.stdout)["items"] == 2
    assert len(json.loads(out.read_text())["images"]) == 2

    bad = runner.invoke(cli_app, ["export", "yolo", "--out", str(tmp_path / "y.json")])
    assert bad.exit_code == 1 and "unknown export format 'yolo'" in bad.output


def test_cli_submit_errors(server, tmp_path):
    _, address = server
    image = tmp_path / "a.png"
    image.write_bytes(png(80))
    bad_stage = runner.invoke(cli_app, ["submit", str(image), "--stage", "9", "--address", address])
    assert bad_stage.exit_code == 2 and "unknown stage '9'" in bad_stage.output
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    refused = runner.invoke(cli_app, ["submit", str(empty), "--address", address])
    assert refused.exit_code == 1 and "empty.png: empty (0 bytes)" in " ".join(refused.output.split())
    nobody = runner.invoke(cli_app, ["status", "--address", f"127.0.0.1:{free_port()}"])
    assert nobody.exit_code == 1 and "UNAVAILABLE" in nobody.output
