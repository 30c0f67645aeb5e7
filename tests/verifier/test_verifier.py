"""Verifier: the Verification containers, the offline ``heuristic`` backend behind VerifierCore,
the Verify gRPC service over loopback, and the ``verify`` pipeline step on a local directory and
an S3 server; each bad input fails with a message naming the problem."""

from __future__ import annotations

import json
import math
import re

import grpc
import numpy as np
import pytest

from services.common.concepts import HardNegative, NounPhrase, Proposal
from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.errors import InvalidInput, NotFound
from services.common.keys import step_key
from services.common.masks import MaskRecord, encode_rle, sa1b_document
from services.common.pb import common_pb2, verifier_pb2, verifier_pb2_grpc
from services.common.settings import Settings
from services.common.steps import StepRequest, run_step
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.verifier.core import PhrasePair, VerifierCore, make_backend
from services.verifier.heuristic import HeuristicVerifier
from services.verifier.servicer import add_to_server
from services.verifier.step import make_handler
from tests.common.image_cases import png
from tests.servers import grpc_loopback

MAX_MESSAGE = 4 << 20


SIZE = (12, 16)  # H, W of every mask's image


def mask(iou: float, stability: float, seed: int = 0) -> MaskRecord:
    """A 3x3 square with SAM's two quality signals; ``seed`` moves it (distinct RLEs for seeds 0-11).

    Its geometry costs nothing (one blob, no hole, off the border, 5% of the image), so it scores
    exactly clip(iou) * clip(stability)."""
    m = np.zeros(SIZE, bool)
    x = 1 + seed % 12
    m[1:4, x:x + 3] = True
    return MaskRecord(segmentation=encode_rle(m), bbox=[x, 1, 3, 3], area=9, predicted_iou=iou,
                      stability_score=stability)


def drawn(pixels: np.ndarray, iou: float = 1.0, stability: float = 1.0) -> MaskRecord:
    """A mask of any HxW bool array, SAM-confident by default."""
    ys, xs = np.nonzero(pixels)
    box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1] if len(xs) else [0, 0, 0, 0]
    return MaskRecord(segmentation=encode_rle(pixels), bbox=box, area=int(pixels.sum()), predicted_iou=iou,
                      stability_score=stability)


# seven grid masks of quality 0.9, 0.8, ... 0.3: the top five average 0.7
GRID = [mask(q, 1.0, seed=i) for i, q in enumerate([0.3, 0.9, 0.4, 0.8, 0.7, 0.6, 0.5])]


@pytest.fixture
def core(local_store) -> VerifierCore:
    return VerifierCore("heuristic", local_store)


# -- containers -------------------------------------------------------------------------------

def _verification() -> Verification:
    return Verification(pairs=[PairVerdict("cat", False, 0.5, [Verdict("mask", "accept", 0.5, "h", "cat", [0])], 1),
                               PairVerdict("dog", True, 0.25, [Verdict("hard_negative", "review", 0.25, "h", "dog")])],
                        score=0.5)


def test_verification_round_trips_through_json_and_converts_to_proto():
    v = _verification()
    assert Verification.from_json(json.loads(json.dumps(v.to_json()))) == v
    msg = v.to_proto()
    assert msg.score == 0.5 and [p.phrase for p in msg.pairs] == ["cat", "dog"]
    assert Verdict.from_proto(msg.pairs[0].verdicts[0]) == v.pairs[0].verdicts[0]


# how to break good JSON -> a phrase the error must contain
BAD_VERIFICATIONS = {
    "not an object": (lambda d: [d], "needs 'pairs'"),
    "no score": (lambda d: {"pairs": d["pairs"]}, "needs 'pairs'"),
    "NaN score": (lambda d: {**d, "score": math.nan}, "verification score must be a finite number"),
    "pair not an object": (lambda d: {**d, "pairs": ["cat"]}, "pairs[0] must be a JSON object"),
    "pair without phrase": (lambda d: {**d, "pairs": [{"is_negative": False, "score": 1}]}, "pairs[0] needs"),
    "is_negative not bool": (lambda d: {**d, "pairs": [{**d["pairs"][0], "is_negative": "no"}]}, "is_negative"),
    "pair score text": (lambda d: {**d, "pairs": [{**d["pairs"][0], "score": "1"}]}, "pairs[0] score"),
    "verdict without check": (lambda d: {**d, "pairs": [{**d["pairs"][0], "verdicts": [{"score": 1}]}]},
                              "malformed verdict"),
}


@pytest.mark.parametrize("case", sorted(BAD_VERIFICATIONS))
def test_malformed_verification_json_names_the_problem(case):
    breaker, phrase = BAD_VERIFICATIONS[case]
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        Verification.from_json(breaker(_verification().to_json()))


# -- heuristic --------------------------------------------------------------------------------

def test_mask_pairs_score_the_mean_of_clipped_iou_times_stability(core):
    # 1.2 clips to 1 (x 0.5 = 0.5); 0.8 x 0.9 = 0.72; a negative IoU clips to 0
    result = core.verify([("car", [mask(1.2, 0.5), mask(0.8, 0.9), mask(-0.1, 0.9)], False)], GRID)
    (pair,) = result.pairs
    assert [v.score for v in pair.verdicts] == pytest.approx([0.5, 0.72, 0.0])
    assert [v.mask_indices for v in pair.verdicts] == [[0], [1], [2]]
    assert [v.choice for v in pair.verdicts] == ["accept", "accept", "reject"]
    assert {v.check for v in pair.verdicts} == {"mask"} and pair.mask_count == 3
    assert pair.score == pytest.approx((0.5 + 0.72) / 3) and result.score == pair.score


def _shape(name: str) -> np.ndarray:
    """The HxW (SIZE) bool masks of CONSTRUCTED."""
    m = np.zeros(SIZE, bool)
    if name == "whole image":
        m[:] = True
    elif name == "nearly the whole image":
        m[:] = True
        m[:3, :3] = False
    elif name == "speckled":
        m[1::3, 1::3] = True
    elif name == "mesh":
        m[1:11, 1:15] = True
        m[2:10:2, 2:14:2] = False
    elif name == "solid blob":
        m[3:9, 4:10] = True
    elif name == "blob in a corner":
        m[0:6, 0:6] = True
    elif name == "two blobs":
        m[2:6, 2:6] = True
        m[7:10, 9:13] = True
    return m


# SAM-confident masks (IoU = stability = 1): shape -> (score, choice); the comment is the formula's factor
CONSTRUCTED = {
    "empty": (0.0, "reject"),  # g_area = 0
    "whole image": (0.0, "whole_image"),  # g_area = 0 (and g_edge = 0.5)
    "nearly the whole image": (0.2569, "whole_image"),  # 95.3%: g_area 0.47, g_edge 1 - 0.5 * 0.904
    "speckled": (0.2083, "reject"),  # 20 fragments: 1 / (1 + 0.2 * 19)
    "mesh": (0.2941, "reject"),  # 24 holes: 1 / (1 + 0.1 * 24)
    "solid blob": (1.0, "accept"),
    "blob in a corner": (0.8942, "accept"),  # covers 11 of the 52 frame pixels: 1 - 0.5 * 11 / 52
    "two blobs": (0.8333, "accept"),  # 1 / (1 + 0.2)
}


@pytest.mark.parametrize("shape", list(CONSTRUCTED))
def test_mask_geometry_lowers_the_score_of_broken_masks(core, shape):
    score, choice = CONSTRUCTED[shape]
    (verdict,) = core.verify([PhrasePair("thing", [drawn(_shape(shape))])]).pairs[0].verdicts
    assert verdict.score == pytest.approx(score, abs=1e-4) and verdict.choice == choice
    # SAM's own doubt multiplies in
    (doubted,) = core.verify([PhrasePair("thing", [drawn(_shape(shape), 0.5, 0.8)])]).pairs[0].verdicts
    assert doubted.score == pytest.approx(0.4 * score, abs=1e-4)


def test_broken_grid_masks_do_not_vouch_for_labels(core):
    broken = [drawn(_shape(s)) for s in ("empty", "whole image", "speckled")]
    assert core.verify([PhrasePair("sky")], broken).score == pytest.approx(0.2083 / 3, abs=1e-4)
    assert core.verify([PhrasePair("sky")], broken + [drawn(_shape("solid blob"))]).score == pytest.approx(
        (1.0 + 0.2083) / 4, abs=1e-4)


def test_ungrounded_labels_get_the_grid_quality_as_exhaustivity(core):
    result = core.verify([PhrasePair("sky")], GRID)
    (verdict,) = result.pairs[0].verdicts
    assert verdict.check == "exhaustivity" and verdict.score == pytest.approx(0.7)  # top 5 of 7
    assert verdict.choice == "accept"
    # no grid masks: nothing to vouch for it
    (verdict,) = core.verify([PhrasePair("sky")], []).pairs[0].verdicts
    assert (verdict.score, verdict.choice) == (0.0, "ungroundable")
    assert core.verify([PhrasePair("sky")], []).score == 0.0
    assert HeuristicVerifier(top_k=1).verify(None, [PhrasePair("sky")], GRID).score == pytest.approx(0.9)


def test_hard_negatives_get_the_neutral_prior_and_do_not_set_the_item_score(core):
    result = core.verify([PhrasePair("car", [mask(0.95, 1.0)]), PhrasePair("truck", is_negative=True)], GRID)
    negative = result.pairs[1]
    assert negative.is_negative and negative.score == 0.5 and negative.mask_count == 0
    assert [(v.check, v.choice) for v in negative.verdicts] == [("hard_negative", "review")]
    assert result.score == pytest.approx(0.95)  # min over positives only
    trusting = VerifierCore(HeuristicVerifier(negative_score=0.8))
    assert trusting.verify([PhrasePair("truck", is_negative=True)], GRID).pairs[0].score == 0.8


def test_item_score_is_the_weakest_positive_or_the_grid_quality(core):
    pairs = [PhrasePair("car", [mask(0.95, 1.0)]), PhrasePair("wheel", [mask(0.6, 1.0)]), PhrasePair("sky")]
    assert core.verify(pairs, GRID).score == pytest.approx(0.6)
    assert core.verify([], GRID).score == pytest.approx(0.7)
    assert core.verify([PhrasePair("truck", is_negative=True)], GRID).score == pytest.approx(0.7)


def test_checks_select_which_pairs_are_verified(core):
    pairs = [PhrasePair("car", [mask(0.95, 1.0)]), PhrasePair("sky"), PhrasePair("truck", is_negative=True)]
    assert [p.phrase for p in core.verify(pairs, GRID, checks=["mask"]).pairs] == ["car"]
    assert [p.phrase for p in core.verify(pairs, GRID, checks=["hard_negative"]).pairs] == ["truck"]
    assert len(core.verify(pairs, GRID, checks=[]).pairs) == 3


# (pairs, grid, checks) -> a phrase the error must contain
BAD_VERIFY_CALLS = {
    "NaN IoU": (([("car", [mask(0.9, 1.0), mask(math.nan, 1.0)], False)], [], ()), "'car' mask 1 has predicted_iou"),
    "inf stability": (([("car", [mask(0.9, math.inf)], False)], [], ()), "'car' mask 0 has stability_score"),
    "NaN in the grid": (([], [mask(0.9, 1.0), mask(0.9, 1.0), mask(math.nan, 0.5)], ()), "grid mask 2"),
    "empty phrase": (([(" ", [], False)], [], ()), "pair 0 has an empty phrase"),
    "repeated phrase": (([("Cat", [], False), ("cat", [], True)], [], ()), "given twice (pairs 0 and 1)"),
    "negative with masks": (([("dog", [mask(0.9, 1.0)], True)], [], ()), "hard negative but has 1 masks"),
    "not a pair": (([("dog",) * 4], [], ()), "pair 0 must be (phrase, masks, is_negative)"),
    "unknown check": (([], [], ("mask", "vibes")), "unknown checks ['vibes']"),
    "masks of two sizes": (([("car", [mask(0.9, 1.0)], False)], [drawn(np.ones((4, 4), bool))], ()),
                           "grid mask 0 is 4x4 but pair 'car' mask 0 is 12x16"),
    "malformed RLE": (([("car", [MaskRecord({"size": list(SIZE), "counts": "0"}, [0, 0, 1, 1], 1, 0.9, 1.0)],
                        False)], [], ()), "pair 'car' mask 0 has a malformed RLE: its runs cover 0 pixels"),
    "no mask size": (([("car", [MaskRecord({"counts": "0"}, [0, 0, 1, 1], 1, 0.9, 1.0)], False)], [], ()),
                     "pair 'car' mask 0 segmentation needs 'size'"),
}


@pytest.mark.parametrize("case", sorted(BAD_VERIFY_CALLS))
def test_bad_calls_are_invalid_input(core, case):
    (pairs, grid, checks), phrase = BAD_VERIFY_CALLS[case]
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        core.verify(pairs, grid, checks)


def test_unknown_backend_and_missing_image(core):
    with pytest.raises(InvalidInput, match="unknown verifier backend 'mllm'; one of heuristic"):
        make_backend("mllm")
    with pytest.raises(NotFound, match="images/none"):
        core.verify([PhrasePair("sky")], GRID, image="images/none")


def test_core_from_settings(tmp_path):
    core = VerifierCore.from_settings(Settings(store="local", store_root=tmp_path / "s"))
    assert isinstance(core.backend, HeuristicVerifier) and core.store is not None
    with pytest.raises(InvalidInput, match="unknown verifier backend 'x'"):
        VerifierCore.from_settings(Settings(store="local", store_root=tmp_path / "s", verifier_backend="x"))


# -- gRPC -------------------------------------------------------------------------------------

@pytest.fixture
def stub(core):
    with grpc_loopback(lambda s: add_to_server(s, core), MAX_MESSAGE) as (channel, _):
        yield verifier_pb2_grpc.VerifierStub(channel)


def _pm(phrase: str, masks=(), is_negative=False) -> verifier_pb2.PhraseMasks:
    return verifier_pb2.PhraseMasks(phrase=phrase, masks=[m.to_proto() for m in masks], is_negative=is_negative)


def test_verify_over_grpc_uses_the_union_of_the_request_masks_as_grid(stub):
    shared = mask(0.5, 1.0, seed=1)
    request = verifier_pb2.VerifyRequest(image=common_pb2.ImageRef(data=png(*SIZE)), pairs=[
        _pm("car", [mask(1.0, 1.0, seed=0), shared]), _pm("wheel", [shared]), _pm("sky"), _pm("truck", is_negative=True)])
    reply = stub.Verify(request, timeout=10)
    assert [p.phrase for p in reply.pairs] == ["car", "wheel", "sky", "truck"]
    # grid = {1.0, 0.5}: the shared mask counts once, so "sky" gets 0.75, not (1 + 0.5 + 0.5) / 3
    assert [p.score for p in reply.pairs] == pytest.approx([0.75, 0.5, 0.75, 0.5])
    assert reply.score == pytest.approx(0.5)
    only = stub.Verify(verifier_pb2.VerifyRequest(image=request.image, pairs=request.pairs, checks=["mask"]))
    assert [p.phrase for p in only.pairs] == ["car", "wheel"]


# request fields -> (status, phrase in the details)
BAD_REQUESTS = {
    "no image": ({"image": None}, grpc.StatusCode.INVALID_ARGUMENT, "has no image"),
    "no pairs": ({"pairs": []}, grpc.StatusCode.INVALID_ARGUMENT, "has no pairs"),
    "NaN IoU": ({"pairs": [_pm("car", [mask(math.nan, 1.0)])]}, grpc.StatusCode.INVALID_ARGUMENT,
                "'car' mask 0 has predicted_iou nan"),
    "unknown check": ({"checks": ["colour"]}, grpc.StatusCode.INVALID_ARGUMENT, "unknown checks"),
    "negative with masks": ({"pairs": [_pm("dog", [mask(0.9, 1.0)], True)]}, grpc.StatusCode.INVALID_ARGUMENT,
                            "hard negative"),
    "missing key": ({"image": common_pb2.ImageRef(key="images/none")}, grpc.StatusCode.NOT_FOUND, "images/none"),
    "masks not of the image's size": ({"image": common_pb2.ImageRef(data=png(24, 40)),
                                       "pairs": [_pm("car", [mask(0.9, 1.0)])]},
                                      grpc.StatusCode.INVALID_ARGUMENT,
                                      "pair 'car' mask 0 is 12x16 but the image is 24x40 (H x W)"),
    "masks of two sizes": ({"pairs": [_pm("car", [mask(0.9, 1.0), drawn(np.ones((4, 4), bool))])]},
                           grpc.StatusCode.INVALID_ARGUMENT, "pair 'car' mask 1 is 4x4 but pair 'car' mask 0 is 12x16"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_status_naming_the_problem(stub, case):
    fields, code, phrase = BAD_REQUESTS[case]
    request = {"image": common_pb2.ImageRef(data=png(*SIZE)), "pairs": [_pm("sky")], **fields}
    if request["image"] is None:
        del request["image"]
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(verifier_pb2.VerifyRequest(**request), timeout=10)
    assert err.value.code() == code
    assert phrase in err.value.details()


# -- pipeline step ----------------------------------------------------------------------------

@pytest.fixture(params=["local_store", "minio_store"])
def store(request):
    return request.getfixturevalue(request.param)


def _stage_outputs(store, item_id: str = "item-1") -> dict:
    """What the propose and decode steps leave for an item; returns the verify step's inputs."""
    store.put("images/abc", png(*SIZE))
    store.put("masks/m/abc/p.json", json.dumps(sa1b_document("abc", SIZE, GRID)).encode())
    proposal = Proposal([NounPhrase.at("car", box=(0, 0, 4, 4)), NounPhrase("sky")],
                        [HardNegative("truck", "model"), HardNegative("bus", "ontology_sibling")])
    store.put(step_key(item_id, "propose"), proposal.to_bytes())
    decoded = DecodeOutput("masks/m/abc/p.json", [GroundedPhrase("car", False, [mask(0.9, 1.0)], True, "labels"),
                                                  GroundedPhrase("sky", source="labels"),
                                                  GroundedPhrase("truck", True, source="labels")])
    store.put(step_key(item_id, "decode"), decoded.to_bytes())
    return {"decode_key": step_key(item_id, "decode"), "concepts_key": step_key(item_id, "propose"),
            "image_key": "images/abc"}


def test_verify_step_writes_the_verification_at_its_step_key(store):
    inputs = _stage_outputs(store)
    outcome = run_step(make_handler(VerifierCore("heuristic", store), store), StepRequest("item-1", "verify", inputs))
    assert outcome.ok, outcome.reason
    key = step_key("item-1", "verify")
    assert outcome.outputs == {"verify_key": key, "score": pytest.approx(0.7)}  # min(car 0.9, sky 0.7)
    stored = Verification.from_json(json.loads(store.get(key)))
    # "bus" is only in the proposal: verified as a negative too; "truck" is not doubled
    assert [(p.phrase, p.is_negative) for p in stored.pairs] == [
        ("car", False), ("sky", False), ("truck", True), ("bus", True)]
    assert stored.score == outcome.outputs["score"]


# how to break the stored inputs -> (code, phrase in the reason)
BAD_STEPS = {
    "no decode_key": (lambda s, i: i.pop("decode_key"), "INVALID_ARGUMENT", "needs input 'decode_key'"),
    "decode output missing": (lambda s, i: i.update(decode_key="items/x/decode.json"), "NOT_FOUND",
                              "items/x/decode.json"),
    "grid masks missing": (lambda s, i: s.delete("masks/m/abc/p.json"), "NOT_FOUND", "masks/m/abc/p.json"),
    "grid masks not SA-1B": (lambda s, i: s.put("masks/m/abc/p.json", b'{"image": {}}'), "INVALID_ARGUMENT",
                             "not an SA-1B document"),
    "malformed proposal": (lambda s, i: s.put(i["concepts_key"], b'{"phrases": [{"score": 1}]}'),
                           "INVALID_ARGUMENT", "lacks 'text'"),
    "NaN in a grid mask": (lambda s, i: s.put("masks/m/abc/p.json", json.dumps(sa1b_document(
        "abc", SIZE, [mask(0.9, 1.0), mask(math.nan, 1.0)])).encode()), "INVALID_ARGUMENT", "grid mask 1"),
    "image missing": (lambda s, i: s.delete("images/abc"), "NOT_FOUND", "images/abc"),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_step_inputs_fail_the_item_with_a_reason(local_store, case):
    breaker, code, phrase = BAD_STEPS[case]
    inputs = _stage_outputs(local_store, "item-2")
    breaker(local_store, inputs)
    outcome = run_step(make_handler(VerifierCore("heuristic", local_store), local_store),
                       StepRequest("item-2", "verify", inputs))
    assert not outcome.ok and outcome.code == code and phrase in outcome.reason, outcome
    assert not local_store.exists(step_key("item-2", "verify"))
