"""The orchestrator end to end in one process: the real step handlers on the tiny SAM, reports
applied by ``Orchestrator.report``, routing by the verifier's score, retries, dead letters,
redelivery, resume after an interruption, and human review."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from PIL import Image

from services.common.concepts import HardNegative, NounPhrase, Proposal
from services.common.errors import DataEngineError, FailedPrecondition, TransientError
from services.common.review import ReviewSubmission
from services.common.settings import Settings
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.concepts import step as concepts_step
from services.concepts.core import ConceptsCore
from services.app.embedded import EmbeddedEngine
from services.common.image_source import ImageSource
from services.orchestrator.model import DECODE, EMBED, PROPOSE, VERIFY, ItemState, Stage
from services.orchestrator.routing import Thresholds
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.openai_stub import Reply

GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


class ScriptedVerifier:
    """A verifier backend whose pair scores are given per phrase (the model's judgement, which
    random weights cannot supply); the item score is the minimum over positives, as documented."""

    name = "scripted"
    needs_pixels = False

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def verify(self, pixels, pairs, grid_masks, checks) -> Verification:
        results = [PairVerdict(p.phrase, p.is_negative, self.scores[p.phrase],
                               [Verdict("mask", "accept", self.scores[p.phrase], self.name, p.phrase)])
                   for p in pairs]
        positives = [r.score for r in results if not r.is_negative]
        return Verification(results, min(positives) if positives else 0.0)


class BoxConcepts:
    """A concepts backend that grounds each known label with a box, and proposes one negative."""

    name = "boxes"
    needs_pixels = False

    def propose(self, pixels, known_labels: Sequence[str], max_positives=0, max_negatives=0) -> Proposal:
        return Proposal([NounPhrase.at(t, 1.0, self.name, box=(2.0, 2.0, 30.0, 20.0)) for t in known_labels],
                        [HardNegative("unicorn", "ontology_sibling", 0.9, self.name)])


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 56, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


@pytest.fixture
def make_engine(tmp_path, tiny_sam):
    def make(verifier=None, concepts=None, out: Path | None = None, **settings) -> EmbeddedEngine:
        # the labels backend unless a test says otherwise: the scripted verifier knows its phrases
        settings = {"concepts_backend": "labels", **settings}
        engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID, **settings), out or tmp_path / "out",
                                sam=tiny_sam)
        engine.dispatcher.sleep = lambda s: None  # backoff without waiting
        if verifier is not None:
            engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(VerifierCore(verifier, engine.store),
                                                                            engine.store)
        if concepts is not None:
            engine.dispatcher.handlers[PROPOSE] = concepts_step.make_handler(ConceptsCore(concepts, engine.store),
                                                                             engine.store)
        return engine

    return make


def count_steps(engine: EmbeddedEngine) -> list[str]:
    calls: list[str] = []
    for step, handler in list(engine.dispatcher.handlers.items()):
        def counted(request, handler=handler, step=step):
            calls.append(step)
            return handler(request)
        engine.dispatcher.handlers[step] = counted
    return calls


@pytest.mark.parametrize("score, stage, state", [
    (0.95, Stage.FULLY_AUTOMATIC, ItemState.ACCEPTED),
    (0.9, Stage.FULLY_AUTOMATIC, ItemState.ACCEPTED),   # the accept boundary is accepted
    (0.89, Stage.FULLY_AUTOMATIC, ItemState.REVIEW),
    (0.7, Stage.FULLY_AUTOMATIC, ItemState.REVIEW),     # the review boundary is reviewed
    (0.69, Stage.FULLY_AUTOMATIC, ItemState.REJECTED),  # to the stage-2 fix queue
    (0.95, Stage.SEMI_AUTOMATIC, ItemState.REVIEW),     # stage 2: never accepted without a human
])
def test_items_route_by_the_verifier_score(make_engine, images, score, stage, state):
    engine = make_engine(ScriptedVerifier({"dog": score, "cat": 1.0}))
    calls = count_steps(engine)
    result = engine.process(images / "im0.png", "im0.png", ["dog", "cat"], stage)
    assert result.state == state.name.lower(), result
    assert result.score == pytest.approx(score)  # min over the positive pairs
    assert sorted(calls) == sorted([EMBED, PROPOSE, DECODE, VERIFY])  # each step once
    item = engine.orchestrator.load(result.item_id)
    assert set(item.timings) == {EMBED, PROPOSE, DECODE, VERIFY} and item.timings[DECODE] > 0
    assert {p.phrase: p.state for p in item.phrases}["dog"] == state
    assert [h[0] for h in item.history][:1] == ["INGESTED"] and item.history[-1][0] == state.name


def test_grounded_phrases_get_masks_and_negatives_none(make_engine, images):
    engine = make_engine(ScriptedVerifier({"dog": 0.95, "unicorn": 0.8}), BoxConcepts())
    result = engine.process(images / "im1.png", "im1.png", ["dog"])
    item = engine.orchestrator.load(result.item_id)
    by_phrase = {p.phrase: p for p in item.phrases}
    assert by_phrase["dog"].grounded and len(by_phrase["dog"].masks) == 1
    assert by_phrase["unicorn"].is_negative and by_phrase["unicorn"].masks == []
    assert by_phrase["dog"].masks[0].segmentation["size"] == [item.height, item.width]
    assert item.state == ItemState.ACCEPTED  # the negative's score does not enter the item's


def test_the_same_file_twice_is_one_item_and_runs_once(make_engine, images):
    engine = make_engine()
    calls = count_steps(engine)
    first = engine.process(images / "im2.png", "im2.png", ["dog"])
    again = engine.process(images / "im2.png", "im2.png", ["dog"])
    assert first.item_id == again.item_id and len(calls) == 4
    assert engine.orchestrator.stats().by_state == {first.state: 1}


def test_bad_images_fail_with_the_reason_and_others_go_on(make_engine, images):
    (images / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    engine = make_engine()
    bad = engine.process(images / "junk.png", "junk.png", ["dog"])
    good = engine.process(images / "im3.png", "im3.png", ["dog"])
    empty = (images / "empty.png")
    empty.write_bytes(b"")
    nothing = engine.process(empty, "empty.png", ["dog"])
    assert bad.state == "failed" and "junk.png" in bad.reason and bad.reason.startswith("embed:")
    assert good.state in ("accepted", "review", "rejected")
    assert nothing.state == "failed" and "empty" in nothing.reason and nothing.item_id == ""


def test_a_redelivered_report_is_applied_once_and_dispatches_nothing_new(make_engine, images):
    engine = make_engine()
    orch, dispatcher = engine.orchestrator, engine.dispatcher
    (item_id,) = orch.submit([ImageSource(data=(images / "im4.png").read_bytes(), filename="im4.png")], ["dog"])
    embed = dispatcher.queue.popleft()
    assert embed.step == EMBED and [r.step for r in dispatcher.queue] == [PROPOSE]
    report = dispatcher.run_one(embed)
    orch.report(report)
    orch.report(report)  # the worker died after reporting: the task ran again
    assert orch.load(item_id).done == [EMBED]
    assert [r.step for r in dispatcher.queue] == [PROPOSE]  # nothing sent twice
    dispatcher.run(orch.report)
    item = orch.load(item_id)
    assert sorted(item.done) == sorted([EMBED, PROPOSE, DECODE, VERIFY]) and item.settled
    assert orch.report(report).state == item.state  # a late duplicate changes nothing


def test_transient_errors_retry_then_dead_letter(make_engine, images):
    engine = make_engine(max_attempts=3)
    real = engine.dispatcher.handlers[PROPOSE]
    failures = {"left": 1}

    def flaky(request):
        if failures["left"]:
            failures["left"] -= 1
            raise TransientError("object store: connection reset")
        return real(request)

    engine.dispatcher.handlers[PROPOSE] = flaky
    recovered = engine.process(images / "im0.png", "im0.png", ["dog"])
    assert recovered.state != "failed" and failures["left"] == 0

    def down(request):
        raise TransientError("object store: connection refused")

    engine.dispatcher.handlers[PROPOSE] = down
    dead = engine.process(images / "im1.png", "im1.png", ["dog"])
    assert dead.state == "failed" and "gave up after 3 attempts" in dead.reason
    stats = engine.orchestrator.stats()
    assert stats.dead_letters == 1
    (letter,) = engine.orchestrator.index.dead_letters()
    assert letter["item_id"] == dead.item_id and letter["step"] == PROPOSE and letter["attempts"] == 3


def test_unusable_step_output_fails_the_item(make_engine, images):
    engine = make_engine()
    engine.dispatcher.handlers[DECODE] = lambda request: {"count": 3}  # no keys: a broken stage
    result = engine.process(images / "im5.png", "im5.png", ["dog"])
    assert result.state == "failed" and "decode" in result.reason and "decode_key" in result.reason


def test_an_interrupted_run_resumes_without_redoing_finished_steps(make_engine, images, tmp_path):
    out = tmp_path / "resumable"
    first = make_engine(out=out)
    (item_id,) = first.orchestrator.submit([ImageSource(data=(images / "im0.png").read_bytes(),
                                                       filename="im0.png")], ["dog"])
    first.orchestrator.report(first.dispatcher.run_one(first.dispatcher.queue.popleft()))  # embed only
    embedding = first.store.root / first.orchestrator.load(item_id).outputs[EMBED]
    stamp = embedding.stat().st_mtime_ns
    del first  # the process dies: its in-memory queue (propose, now) is gone

    again = make_engine(out=out)
    calls = count_steps(again)
    assert again.resume() == 1
    assert sorted(calls) == sorted([PROPOSE, DECODE, VERIFY])  # embed is not redone
    assert embedding.stat().st_mtime_ns == stamp
    assert again.orchestrator.load(item_id).settled
    assert again.resume() == 0


def test_assisted_manual_items_wait_for_an_annotator(make_engine, images):
    engine = make_engine()
    calls = count_steps(engine)
    result = engine.process(images / "im2.png", "im2.png", [], Stage.ASSISTED_MANUAL)
    assert result.state == "review" and calls == [EMBED]
    orch = engine.orchestrator
    claimed = orch.next_review("ann")
    assert claimed.item_id == result.item_id and claimed.lease.annotator == "ann"
    assert orch.next_review("bob") is None  # claimed by ann
    with pytest.raises(FailedPrecondition, match="held by 'ann'"):
        orch.submit_review(ReviewSubmission(result.item_id, "bob", "forged", True))
    done = orch.submit_review(ReviewSubmission(result.item_id, "ann", claimed.lease.token, True))
    assert done.state == ItemState.ACCEPTED and done.reason == "reviewed by ann" and done.reviewer == "ann"
    with pytest.raises(FailedPrecondition, match="lease on item .* is gone"):
        orch.submit_review(ReviewSubmission(result.item_id, "ann", claimed.lease.token, False))


@pytest.mark.parametrize("call, match", [
    (lambda o: o.submit([]), "no images"),
    (lambda o: o.submit([ImageSource(key="images/nothing")]), "not found"),
    (lambda o: o.submit([ImageSource(key="../etc/passwd")]), "key"),
    (lambda o: o.submit([ImageSource(data=b"x")], ["  "]), "empty"),
    (lambda o: o.submit([ImageSource(data=b"x")], "dog"), "not one string"),
    (lambda o: o.submit([ImageSource(data=b"x")], stage="stage_9"), "unknown stage"),
    (lambda o: o.list_items(page_size=0), "page_size"),
    (lambda o: o.next_review(" "), "annotator"),
])
def test_bad_requests_name_the_problem(make_engine, call, match):
    with pytest.raises(DataEngineError, match=match):  # each carries its gRPC status code
        call(make_engine().orchestrator)


def test_listing_pages_through_items_by_state(make_engine, images):
    engine = make_engine(ScriptedVerifier({"dog": 0.95}))
    ids = {engine.process(images / f"im{i}.png", f"im{i}.png", ["dog"]).item_id for i in range(5)}
    seen, token = [], ""
    while True:
        page, token = engine.orchestrator.list_items(ItemState.ACCEPTED, page_size=2, token=token)
        seen += [i.item_id for i in page]
        if not token:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    assert engine.orchestrator.list_items(ItemState.FAILED)[0] == []


def test_run_report_lists_every_file_once(make_engine, images):
    engine = make_engine()
    (images / "broken.jpg").write_bytes(b"not an image")
    files = sorted(images.iterdir())
    results = [engine.process(p, p.name, ["dog"]) for p in files]
    paths = engine.write_outputs(results)
    report = json.loads(paths["report"].read_text())
    assert [r["file"] for r in report["items"]] == [p.name for p in files]
    assert report["by_state"]["failed"] == 1 and report["files"] == len(files)
    assert sorted(p.name for p in paths["sa1b"].iterdir()) == sorted(f"{p.stem}.json" for p in files
                                                                      if p.suffix == ".png")


@pytest.mark.parametrize("p_accept, state", [(0.95, ItemState.ACCEPTED), (0.8, ItemState.REVIEW),
                                             (0.5, ItemState.REJECTED)])
def test_model_backends_propose_ground_and_route_the_item(make_engine, images, openai_stub, p_accept, state):
    """Both model backends on one OpenAI-compatible endpoint: the concepts backend reads its JSON
    answer, the verifier its choice logprobs; the item routes on the verifier's score."""
    answer = {"phrases": [{"text": "Dogs", "box": [100, 100, 600, 700], "score": 0.9}],
              "hard_negatives": [{"text": "wolf", "reason": "model", "score": 0.8}]}
    openai_stub.default = Reply(content=json.dumps(answer),
                                logprobs=[("A", math.log(p_accept)), ("B", math.log(1 - p_accept))])
    model = {"concepts_endpoint": openai_stub.url, "concepts_model": "vlm", "verifier_endpoint": openai_stub.url,
             "verifier_model": "vlm", "mllm_max_retries": 0}
    engine = make_engine(concepts_backend="openai", verifier_backend="openai", **model)
    result = engine.process(images / "im2.png", "im2.png", [])
    assert result.state == state.name.lower(), result
    assert result.score == pytest.approx(p_accept, abs=1e-6)  # min over the pairs, each P(accept)
    item = engine.orchestrator.load(result.item_id)
    by_phrase = {p.phrase: p for p in item.phrases}
    assert set(by_phrase) == {"dog", "wolf"}  # cleaned: lower-case, singular
    assert by_phrase["dog"].grounded and len(by_phrase["dog"].masks) == 1 and by_phrase["wolf"].is_negative
    assert [v.check for v in by_phrase["dog"].verdicts] == ["mask", "exhaustivity"]
    assert by_phrase["wolf"].verdicts[0].check == "hard_negative"
    asked = [s.body.get("logprobs", False) for s in openai_stub.seen]
    assert asked.count(False) == 1 and asked.count(True) == 3  # one proposal, three questions


def test_a_local_model_verifier_scores_and_routes_the_item(make_engine, images, tiny_mllm_dir):
    """The transformers verifier (a tiny random Qwen2.5-VL) in the pipeline: whatever it answers,
    the item goes where the thresholds send the weakest pair's score."""
    engine = make_engine(concepts=BoxConcepts(), verifier_backend="transformers", verifier_model_dir=tiny_mllm_dir)
    result = engine.process(images / "im3.png", "im3.png", ["dog"])
    item = engine.orchestrator.load(result.item_id)
    by_phrase = {p.phrase: p for p in item.phrases}
    assert [v.check for v in by_phrase["dog"].verdicts] == ["mask", "exhaustivity"]
    assert [v.check for v in by_phrase["unicorn"].verdicts] == ["hard_negative"]
    assert all(v.source == f"transformers:{tiny_mllm_dir.name}" for p in item.phrases for v in p.verdicts)
    assert item.score == pytest.approx(min(p.score for p in item.phrases))
    assert item.state == Thresholds().route(item.score)
    assert all(p.state == Thresholds().route(p.score) for p in item.phrases)


def test_a_local_model_concepts_backend_in_the_pipeline(make_engine, images, tiny_mllm_dir):
    """The transformers concepts backend (a tiny random Qwen2.5-VL) as the pipeline's proposer:
    its answer is never a proposal, so after the one repair the item fails with that reason,
    the embedding it overlapped with is kept, and the next item is processed all the same."""
    engine = make_engine(concepts_backend="transformers", concepts_model_dir=tiny_mllm_dir, mllm_max_new_tokens=16)
    first = engine.process(images / "im1.png", "im1.png", ["dog"])
    assert first.state == "failed"
    assert "model output of transformers:" in first.reason and "is not a proposal" in first.reason
    item = engine.orchestrator.load(first.item_id)
    assert EMBED in item.done and PROPOSE not in item.done  # run side by side: the embedding is kept
    second = engine.process(images / "im2.png", "im2.png", [])
    assert second.state == "failed" and second.item_id != first.item_id
