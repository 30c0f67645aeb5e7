"""The review desk: queue order, leases (expiry, hand-over, heartbeat, release), submissions with
MV/EV decisions validated like every boundary, audits and annotator figures; over the in-memory and
the Redis index, and the review RPCs over gRPC."""

from __future__ import annotations

from dataclasses import replace

import json

import grpc
import numpy as np
import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import MaskRecord, encode_rle
from services.common.pb import orchestrator_pb2 as pb
from services.common.review import ReviewedMask, ReviewedPhrase, ReviewSubmission
from services.common.storage import LocalStore
from services.common.verdicts import Verdict
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import MemoryIndex, RedisIndex
from services.orchestrator.model import Item, ItemState, PhraseResult, Stage
from tests.orchestrator.test_servicer import (engine, get, inline, png, rpc_error, run, server,  # noqa: F401
                                              stats, stub, submit)

H, W = 40, 56
S, G = ItemState, Stage
Code = grpc.StatusCode


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class NoDispatch:
    def send(self, request) -> None:  # every item here is built settled: nothing is dispatched
        raise AssertionError(f"unexpected step {request}")


@pytest.fixture(params=["memory", "redis"])
def orch(request, tmp_path) -> Orchestrator:
    index = MemoryIndex() if request.param == "memory" else RedisIndex(request.getfixturevalue("broker"))
    orch = Orchestrator(LocalStore(tmp_path / "bucket"), index, NoDispatch(), lease_s=60.0, audit_rate=0.0)
    orch.desk.clock = Clock()
    return orch


def box_mask(y0: int, y1: int, x0: int, x1: int, score: float = 0.9) -> MaskRecord:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return MaskRecord(encode_rle(m), [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], int(m.sum()), score, 0.95,
                      crop_box=[0.0, 0.0, float(W), float(H)])


def put(orch: Orchestrator, n: int, state: ItemState, score: float | None, stage: Stage = G.SEMI_AUTOMATIC,
        phrases=()) -> str:
    item = Item(item_id=f"{n:024x}", source=f"im{n}.png", image_key=f"images/{n}", image_id=str(n), stage=stage,
                height=H, width=W, score=score, phrases=list(phrases))
    item.state = state
    orch.save(item)
    return item.item_id


def take(orch: Orchestrator, who: str) -> Item:
    item = orch.next_review(who)
    assert item is not None and item.lease.annotator == who
    return item


def sub(item: Item, who: str, accept: bool = True, phrases=(), seconds: float = 0.0) -> ReviewSubmission:
    return ReviewSubmission(item.item_id, who, item.lease.token, accept, list(phrases), seconds)


def test_the_queue_hands_out_review_then_fix_then_stage1_lowest_score_first(orch):
    put(orch, 1, S.ACCEPTED, 0.95)  # not queued
    stage1 = put(orch, 2, S.REVIEW, None, G.ASSISTED_MANUAL)
    fix_low, fix_high = put(orch, 3, S.REJECTED, 0.2), put(orch, 4, S.REJECTED, 0.6)
    review_high, review_low = put(orch, 5, S.REVIEW, 0.85), put(orch, 6, S.REVIEW, 0.71)
    assert orch.desk.waiting() == {"review": 2, "fix": 2, "audit": 0, "stage1": 1}
    order = [take(orch, f"ann{i}").item_id for i in range(5)]
    assert order == [review_low, review_high, fix_low, fix_high, stage1]
    assert orch.next_review("ann9") is None
    assert orch.desk.waiting() == {"review": 0, "fix": 0, "audit": 0, "stage1": 0}
    assert orch.stats().review_waiting == {"review": 0, "fix": 0, "audit": 0, "stage1": 0}


def test_an_annotator_holds_one_item_and_gets_it_back(orch):
    first, _ = put(orch, 1, S.REVIEW, 0.8), put(orch, 2, S.REVIEW, 0.75)
    held = take(orch, "ann")
    assert take(orch, "ann").lease.token == held.lease.token  # the same claim, not a second item
    assert take(orch, "bob").item_id != held.item_id
    assert orch.next_review("cid") is None and held.item_id != first


def test_an_expired_lease_is_handed_over_and_its_submit_refused(orch):
    put(orch, 1, S.REVIEW, 0.8)
    clock = orch.desk.clock
    ann = take(orch, "ann")
    assert orch.next_review("bob") is None
    clock.now += 30
    lease = orch.desk.heartbeat(ann.item_id, "ann", ann.lease.token)
    assert lease.expires_at == clock.now + 60
    clock.now += 59
    assert orch.next_review("bob") is None  # the heartbeat kept it
    clock.now += 2
    bob = take(orch, "bob")
    assert bob.item_id == ann.item_id and bob.lease.token != ann.lease.token
    with pytest.raises(FailedPrecondition, match="now held by 'bob'"):
        orch.submit_review(sub(ann, "ann"))
    with pytest.raises(FailedPrecondition, match="now held by 'bob'"):
        orch.desk.heartbeat(ann.item_id, "ann", ann.lease.token)
    assert orch.submit_review(sub(bob, "bob")).state == S.ACCEPTED


def test_an_expired_lease_nobody_took_is_refused_too(orch):
    put(orch, 1, S.REVIEW, 0.8)
    ann = take(orch, "ann")
    orch.desk.clock.now += 61
    with pytest.raises(FailedPrecondition, match="expired 1 s ago"):
        orch.submit_review(sub(ann, "ann"))
    assert take(orch, "ann").lease.token != ann.lease.token  # claimed afresh


def test_a_skipped_item_comes_back_to_its_skipper_last(orch):
    first, second = put(orch, 1, S.REVIEW, 0.71), put(orch, 2, S.REVIEW, 0.8)
    ann = take(orch, "ann")
    assert ann.item_id == first
    orch.desk.release(first, "ann", ann.lease.token)
    assert take(orch, "ann").item_id == second  # not the item just skipped
    assert take(orch, "bob").item_id == first  # for everyone else it keeps its place
    orch.desk.release(first, "bob", orch.load(first).lease.token)
    again = take(orch, "ann")
    assert again.item_id == second  # ann still holds it
    orch.desk.release(second, "ann", again.lease.token)
    assert take(orch, "ann").item_id == first  # all skipped: the queue's order again
    assert orch.load(first).skipped_by == ["ann", "bob"]


def test_skipping_releases_the_item(orch):
    put(orch, 1, S.REVIEW, 0.8)
    ann = take(orch, "ann")
    with pytest.raises(FailedPrecondition):
        orch.desk.release(ann.item_id, "ann", "forged-token")
    assert orch.desk.release(ann.item_id, "ann", ann.lease.token).lease is None
    assert take(orch, "bob").item_id == ann.item_id
    with pytest.raises(InvalidInput, match="lease_token is empty"):
        orch.desk.release(ann.item_id, "bob", "")


def proposed_dog() -> list[PhraseResult]:
    a, b = box_mask(2, 12, 3, 20), box_mask(20, 30, 30, 50)
    a.source = b.source = "sam1:vit_b-test"  # the decoder made them
    return [PhraseResult("dog", masks=[a, b], score=0.8, provenance="ontology", state=S.REVIEW, grounded=True,
                         verdicts=[Verdict("mask", "accept", 0.83, "heuristic", "dog", [0]),
                                   Verdict("mask", "reject", 0.31, "heuristic", "dog", [1]),
                                   Verdict("exhaustivity", "accept", 0.77, "heuristic", "dog", [0, 1])]),
            PhraseResult("wolf", is_negative=True, score=0.5, provenance="ontology", state=S.REVIEW),
            PhraseResult("cat", is_negative=True, score=0.5, provenance="ontology", state=S.REVIEW)]


def test_a_review_keeps_the_human_phrases_and_every_mv_ev_decision(orch):
    item_id = put(orch, 1, S.REVIEW, 0.8, phrases=proposed_dog())
    item = take(orch, "ann")
    a, b = item.phrases[0].masks
    drawn, cat = box_mask(30, 38, 2, 10, score=0.7), box_mask(5, 15, 40, 50)
    orch.desk.clock.now += 42
    done = orch.submit_review(sub(item, "ann", phrases=[
        ReviewedPhrase("puppy", "dog", masks=[ReviewedMask(a, True, "model"), ReviewedMask(b, False, "model"),
                                             ReviewedMask(drawn, True, "human")], exhaustive=True),
        ReviewedPhrase("wolf", "wolf", is_negative=True, negative_check="absent"),
        ReviewedPhrase("cat", "cat", masks=[ReviewedMask(cat)], negative_check="present", exhaustive=False),
        ReviewedPhrase("kite", "", ungroundable=True),
        ReviewedPhrase("fox", "", is_negative=True)], seconds=40.0))
    assert done.state == S.ACCEPTED and done.reviewer == "ann" and done.lease is None
    stored = orch.load(item_id)
    assert stored.to_json() == done.to_json()
    puppy, wolf, cat_phrase, fox = stored.phrases  # the ungroundable phrase is no pair of the dataset
    assert [p.phrase for p in stored.phrases] == ["puppy", "wolf", "cat", "fox"]
    # each mask says who made it, whatever the client sent: the decoder's kept as it was, the drawn one the human's
    assert puppy.masks == [a, replace(drawn, source="human:ann")] and a.source == "sam1:vit_b-test"
    assert puppy.provenance == "human:ann" and puppy.exhaustive is True
    assert [(v.check, v.choice, v.source) for v in puppy.verdicts] == [
        ("mask", "accept", "human:ann"), ("mask", "accept", "human:ann"), ("exhaustivity", "accept", "human:ann")]
    assert wolf.is_negative and not wolf.masks and wolf.verdicts[0].choice == "absent"
    assert not cat_phrase.is_negative and cat_phrase.masks == [replace(cat, source="human:ann")]
    assert cat_phrase.exhaustive is False
    assert fox.is_negative and fox.provenance == "human:ann"
    (record,) = stored.reviews
    assert record.annotator == "ann" and record.kind == "review" and record.seconds == 42.0
    assert record.client_seconds == 40.0 and record.masks == 3
    assert [(m["phrase"], m["accept"], m["origin"], m["model_score"]) for m in record.mv] == [
        ("puppy", True, "model", pytest.approx(0.83)), ("puppy", False, "model", pytest.approx(0.31)),
        ("puppy", True, "human", None), ("cat", True, "human", None)]
    assert MaskRecord.from_json(record.mv[1]["mask"]) == b  # the rejected mask stays, as a label
    assert [(e["phrase"], e["exhaustive"], e["ungroundable"]) for e in record.ev] == [
        ("puppy", True, False), ("cat", False, False), ("kite", None, True)]
    assert record.ev[0]["model_score"] == pytest.approx(0.77)
    assert record.negatives == [{"phrase": "wolf", "check": "absent"}, {"phrase": "cat", "check": "present"}]
    (fig,) = orch.desk.figures()
    figures = fig.to_json()
    assert {k: figures[k] for k in ("annotator", "items", "masks", "seconds", "seconds_per_item",
                                    "seconds_per_mask", "audits")} == {
        "annotator": "ann", "items": 1, "masks": 3, "seconds": 42.0, "seconds_per_item": 42.0,
        "seconds_per_mask": 14.0, "audits": 0}
    assert figures["items_per_hour"] == pytest.approx(3600 / 42, abs=1e-3)
    assert figures["masks_per_hour"] == pytest.approx(3 * 3600 / 42, abs=1e-3)


@pytest.mark.parametrize("phrases, match", [
    # a mask of another size than the image
    ([ReviewedPhrase("dog", masks=[ReviewedMask(MaskRecord(encode_rle(np.ones((W, H), bool)), [], 0, 0, 0))])],
     r"mask 0 of phrase 0 \('dog'\) is 56x40 \(H x W\) but the image is 40x56"),
    # runs that do not tile the image
    ([ReviewedPhrase("dog", masks=[ReviewedMask(MaskRecord({"size": [H, W], "counts": [5, 7]}, [], 0, 0, 0))])],
     "covers? 12 pixels, not 40x56"),
    # an RLE string cut inside a run
    ([ReviewedPhrase("dog", masks=[ReviewedMask(MaskRecord({"size": [H, W], "counts": "PP"}, [], 0, 0, 0))])],
     "ends inside a run"),
])
def test_bad_masks_are_invalid_and_change_nothing(orch, phrases, match):
    item_id = put(orch, 1, S.REVIEW, 0.8, phrases=proposed_dog())
    item = take(orch, "ann")
    with pytest.raises(InvalidInput, match=match):
        orch.submit_review(sub(item, "ann", phrases=phrases))
    after = orch.load(item_id)
    assert after.state == S.REVIEW and after.lease.token == item.lease.token and not after.reviews


@pytest.mark.parametrize("build, match", [
    (lambda: ReviewedPhrase("  "), "non-empty"),
    (lambda: ReviewedPhrase("dog", negative_check="maybe"), "negative_check"),
    (lambda: ReviewedPhrase("wolf", is_negative=True, masks=[ReviewedMask(box_mask(1, 2, 1, 2))]), "absent by"),
    (lambda: ReviewedMask(box_mask(1, 2, 1, 2), origin="robot"), "origin"),
    (lambda: ReviewSubmission("x", "ann", "t", True, [ReviewedPhrase("a"), ReviewedPhrase("a")]), "twice"),
    (lambda: ReviewSubmission("x", "ann", "t", True, seconds_spent=float("nan")), "seconds_spent"),
])
def test_malformed_submissions_name_the_problem(build, match):
    with pytest.raises(InvalidInput, match=match):
        build()


def test_audits_go_to_a_second_annotator_and_record_agreement(orch):
    orch.desk.audit_rate = 1.0
    item_id = put(orch, 1, S.REVIEW, 0.8, phrases=proposed_dog())
    item = take(orch, "ann")
    a, _ = item.phrases[0].masks
    orch.desk.clock.now += 10
    done = orch.submit_review(sub(item, "ann", phrases=[
        ReviewedPhrase("dog", "dog", masks=[ReviewedMask(a, True, "model")], exhaustive=True),
        ReviewedPhrase("wolf", "wolf", is_negative=True, negative_check="absent")]))
    assert done.state == S.ACCEPTED and done.audit == "pending" and done.band == "audit"
    assert orch.next_review("ann") is None  # nobody audits their own work
    audit = take(orch, "bob")
    assert audit.item_id == item_id and audit.band == "audit"
    half = box_mask(2, 7, 3, 20)  # half of ann's mask: IoU 0.5
    orch.submit_review(sub(audit, "bob", phrases=[
        ReviewedPhrase("dog", "dog", masks=[ReviewedMask(half)], exhaustive=False)]))
    after = orch.load(item_id)
    assert after.state == S.ACCEPTED and after.audit == "done" and after.band == "" and after.reviewer == "ann"
    assert [p.phrase for p in after.phrases] == ["dog", "wolf"]  # the first review stays the dataset's
    record = after.reviews[-1]
    # decisions: accept (agree), dog kept by both (agree), its EV (disagree), wolf kept by ann only
    assert record.kind == "audit" and record.agreement == {"decision": 0.5, "mask_iou": pytest.approx(0.5)}
    figures = {f.annotator: f for f in orch.desk.figures()}
    assert figures["ann"].audits == 1 and figures["ann"].audit_mask_iou == pytest.approx(0.5)
    assert figures["ann"].items == 1 and figures["bob"].items == 0  # an audit is no item of the auditor's


def test_the_index_rebuilt_from_manifests_keeps_queue_and_figures(orch):
    put(orch, 1, S.REVIEW, 0.8)
    put(orch, 2, S.REJECTED, 0.1)
    item = take(orch, "ann")
    orch.submit_review(sub(item, "ann", phrases=[ReviewedPhrase("dog", masks=[ReviewedMask(box_mask(1, 5, 1, 5))])]))
    before = [f.to_json() for f in orch.desk.figures()]
    orch.rebuild_index()
    assert [f.to_json() for f in orch.desk.figures()] == before
    assert orch.desk.waiting()["fix"] == 1 and take(orch, "bob").item_id == f"{2:024x}"


# -- over gRPC ------------------------------------------------------------------------------------

def test_stage1_items_are_reviewed_over_grpc_with_leases(engine, stub):
    (item_id,) = submit(stub, inline(png(40), "manual.png"), stage=G.ASSISTED_MANUAL)
    (other,) = submit(stub, inline(png(41), "other.png"), stage=G.ASSISTED_MANUAL)
    assert run(engine) == 2  # only the embeddings: an annotator does the rest
    waiting = get(stub, item_id)
    assert waiting.state == S.REVIEW and waiting.band == "stage1" and not waiting.HasField("lease")
    assert waiting.embedding_key and (waiting.height, waiting.width) == (40, 56) and waiting.image_key

    err = rpc_error(stub.NextReview, pb.NextReviewRequest(annotator=" "))
    assert err.code() == Code.INVALID_ARGUMENT and "annotator" in err.details()
    err = rpc_error(stub.NextReview, pb.NextReviewRequest(annotator="ann", stage=G.SEMI_AUTOMATIC))
    assert err.code() == Code.NOT_FOUND and "no item is waiting for review" in err.details()
    first = stub.NextReview(pb.NextReviewRequest(annotator="ann", stage=G.ASSISTED_MANUAL), timeout=30)
    assert first.lease.annotator == "ann" and first.lease.token and first.lease.expires_at > first.lease.claimed_at
    assert stub.NextReview(pb.NextReviewRequest(annotator="ann"), timeout=30).lease.token == first.lease.token
    second = stub.NextReview(pb.NextReviewRequest(annotator="bob"), timeout=30)
    assert {first.item_id, second.item_id} == {item_id, other}
    assert get(stub, first.item_id).lease.token == ""  # a lease's token goes to its holder only
    assert rpc_error(stub.NextReview, pb.NextReviewRequest(annotator="cid")).code() == Code.NOT_FOUND
    assert {c.key: c.count for c in stub.Stats(pb.StatsRequest(), timeout=30).review_waiting}["stage1"] == 0

    lease = stub.Heartbeat(pb.LeaseRequest(item_id=first.item_id, annotator="ann",
                                           lease_token=first.lease.token), timeout=30)
    assert lease.expires_at >= first.lease.expires_at
    err = rpc_error(stub.Heartbeat, pb.LeaseRequest(item_id=first.item_id, annotator="bob", lease_token="forged"))
    assert err.code() == Code.FAILED_PRECONDITION and "held by 'ann'" in err.details()
    err = rpc_error(stub.SubmitReview, pb.SubmitReviewRequest(item_id=first.item_id, annotator="ann", accept=True))
    assert err.code() == Code.INVALID_ARGUMENT and "lease_token is empty" in err.details()
    token = first.lease.token
    wrong = MaskRecord(encode_rle(np.ones((10, 10), bool)), [0, 0, 10, 10], 100, 1.0, 1.0)
    err = rpc_error(stub.SubmitReview, pb.SubmitReviewRequest(
        item_id=first.item_id, annotator="ann", accept=True, lease_token=token,
        reviewed=[pb.ReviewedPhrase(phrase="dog", masks=[pb.ReviewedMask(mask=wrong.to_proto(), accept=True)])]))
    assert err.code() == Code.INVALID_ARGUMENT and "is 10x10 (H x W) but the image is 40x56" in err.details()

    drawn = np.zeros((40, 56), bool)
    drawn[5:15, 10:30] = True
    # a client's bbox and area are not trusted: the server reads them off the RLE
    mask = MaskRecord(encode_rle(drawn), [0.0, 0.0, 1.0, 1.0], 7, 1.0, 1.0)
    done = stub.SubmitReview(pb.SubmitReviewRequest(
        item_id=first.item_id, annotator="ann", accept=True, lease_token=token, seconds_spent=12.5,
        reviewed=[pb.ReviewedPhrase(phrase="dog", masks=[pb.ReviewedMask(mask=mask.to_proto(), accept=True,
                                                                         origin="human")], exhaustive=True)]),
        timeout=30)
    assert done.state == S.ACCEPTED and done.reason == "reviewed by ann" and done.reviewer == "ann"
    (phrase,) = done.phrases
    assert phrase.phrase == "dog" and phrase.provenance == "human:ann" and phrase.exhaustive
    got = MaskRecord.from_proto(phrase.masks[0])
    assert got.bbox == [10.0, 5.0, 20.0, 10.0] and got.area == int(drawn.sum())

    released = stub.ReleaseReview(pb.LeaseRequest(item_id=second.item_id, annotator="bob",
                                                  lease_token=second.lease.token), timeout=30)
    assert released.state == S.REVIEW and not released.HasField("lease")
    again = stub.NextReview(pb.NextReviewRequest(annotator="cid"), timeout=30)
    assert again.item_id == second.item_id
    discarded = stub.SubmitReview(pb.SubmitReviewRequest(item_id=second.item_id, annotator="cid",
                                                         lease_token=again.lease.token), timeout=30)
    assert discarded.state == S.DISCARDED
    err = rpc_error(stub.SubmitReview, pb.SubmitReviewRequest(item_id=first.item_id, annotator="ann",
                                                              accept=True, lease_token=token))
    assert err.code() == Code.FAILED_PRECONDITION and "is gone" in err.details()
    assert rpc_error(stub.SubmitReview, pb.SubmitReviewRequest(item_id="0" * 24, annotator="ann",
                                                               lease_token="x")).code() == Code.NOT_FOUND
    assert stats(stub)[0] == {"accepted": 1, "discarded": 1}
    figures = stub.AnnotatorStats(pb.AnnotatorStatsRequest(), timeout=30).annotators
    assert [(f.annotator, f.items, f.masks) for f in figures] == [("ann", 1, 1), ("cid", 1, 0)]

    # The human's mask is the dataset's annotation; the discarded item is not exported.
    reply = stub.Export(pb.ExportRequest(format="coco", prefix="exports/reviewed"), timeout=30)
    coco = json.loads(engine.store.get(reply.keys[0]))
    assert reply.items == 1 and [i["item_id"] for i in coco["images"]] == [first.item_id]
    (annotation,) = coco["annotations"]
    assert annotation["area"] == int(drawn.sum()) and annotation["bbox"] == [10.0, 5.0, 20.0, 10.0]


def test_the_backlog_knows_how_long_its_oldest_unclaimed_item_has_waited(orch):
    now = orch.desk.clock.now
    assert orch.desk.oldest_waiting_s() == 0.0  # nothing waits
    ids = []
    for n, (state, score, waited) in enumerate([(S.REVIEW, 0.8, 3600.0), (S.REJECTED, 0.3, 7200.0),
                                                (S.REVIEW, 0.75, 60.0), (S.ACCEPTED, 0.95, 99999.0)]):
        item = Item(item_id=f"{n:024x}", source=f"im{n}.png", image_key=f"images/{n}", image_id=str(n),
                    stage=G.SEMI_AUTOMATIC, height=H, width=W, score=score, state=state,
                    history=[["PENDING", now - waited - 10], [state.name, now - waited]])
        orch.save(item)
        ids.append(item.item_id)
    assert orch.desk.oldest_waiting_s() == 7200.0  # the accepted one is not waiting for anybody
    assert orch.stats().review_oldest_s == 7200.0
    assert orch.stats().to_json()["review_oldest_s"] == 7200.0
    first = take(orch, "ann")  # the review band goes first: the 0.75 one
    assert first.item_id == ids[2] and orch.desk.oldest_waiting_s() == 7200.0
    fix = take(orch, "bob")
    assert fix.item_id == ids[0]  # then 0.8; the rejected one still waits
    orch.submit_review(sub(fix, "bob", accept=False))
    assert orch.desk.oldest_waiting_s() == 7200.0
    third = take(orch, "cy")
    assert third.item_id == ids[1]
    assert orch.desk.oldest_waiting_s() == 0.0  # all three held or settled
    orch.desk.clock.now += 61.0  # ann's and cy's leases (60 s) expire: their items wait again
    assert orch.desk.oldest_waiting_s() == 7261.0
    orch.rebuild_index()  # as `dataengine reconcile` after Redis lost its data
    assert orch.desk.oldest_waiting_s() == 7261.0
