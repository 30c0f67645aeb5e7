"""Item state machine, routing boundaries, manifest round trips."""

import math

import pytest

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.failure_modes import MiningRecord
from services.orchestrator.model import TERMINAL, TRANSITIONS, Item, ItemState, PhraseResult, Stage
from services.orchestrator.routing import Thresholds

S = ItemState


@pytest.mark.parametrize("score, state", [
    (1.0, S.ACCEPTED), (0.9, S.ACCEPTED),                   # the accept boundary is accepted
    (0.8999999, S.REVIEW), (0.7, S.REVIEW),                  # the review boundary is reviewed
    (0.6999999, S.REJECTED), (0.0, S.REJECTED),
])
def test_default_routing_boundaries(score, state):
    assert Thresholds().route(score) == state


def test_custom_thresholds_and_stage_two_is_never_auto_accepted():
    t = Thresholds(accept=0.5, review=0.2)
    assert [t.route(s) for s in (0.5, 0.2, 0.19)] == [S.ACCEPTED, S.REVIEW, S.REJECTED]
    assert Thresholds().route(0.95, Stage.SEMI_AUTOMATIC) == S.REVIEW
    assert Thresholds().route(0.1, Stage.SEMI_AUTOMATIC) == S.REJECTED


@pytest.mark.parametrize("score", [math.nan, -0.1, 1.5, "0.9", None])
def test_bad_scores_are_model_output_errors(score):
    with pytest.raises(InvalidInput, match="verifier score"):
        Thresholds().route(score)


def test_thresholds_must_be_ordered():
    with pytest.raises(ValueError, match="review"):
        Thresholds(accept=0.6, review=0.7)


def _item(**kw) -> Item:
    return Item(item_id="abc", source="a.jpg", image_key="images/x", image_id="x", **kw)


def test_happy_path_transitions_and_history():
    item = _item()
    for state in (S.EMBEDDED, S.CONCEPTS_PROPOSED, S.MASKS_DECODED, S.VERIFIED, S.REVIEW, S.ACCEPTED):
        item.move(state)
    assert [h[0] for h in item.history] == ["INGESTED", "EMBEDDED", "CONCEPTS_PROPOSED", "MASKS_DECODED",
                                             "VERIFIED", "REVIEW", "ACCEPTED"]
    assert item.settled


def test_illegal_moves_and_terminal_states_are_refused():
    item = _item()
    with pytest.raises(FailedPrecondition, match="ingested to verified"):
        item.move(S.VERIFIED)
    item.fail("bad bytes")
    assert item.state == S.FAILED and item.reason == "bad bytes"
    for terminal in TERMINAL:
        assert not TRANSITIONS[terminal]
    with pytest.raises(FailedPrecondition):
        item.move(S.EMBEDDED)
    item.fail("again")  # already failed: the first reason stands
    assert item.reason == "bad bytes"


def test_every_non_terminal_state_can_fail():
    for state in ItemState:
        if state in TERMINAL or state == S.UNSPECIFIED:
            continue
        item = _item(state=state)
        item.fail("x")
        assert item.state == S.FAILED


def test_manifest_and_proto_round_trip():
    item = _item(known_labels=["dog"], stage=Stage.SEMI_AUTOMATIC)
    item.phrases = [PhraseResult("dog", score=0.8, provenance="labels", state=S.REVIEW),
                    PhraseResult("cat", is_negative=True, score=1.0)]
    item.failure_modes, item.priority, item.amg_params = ["rare_phrase"], 0.4, {"points_per_side": 8}
    item.mining = [MiningRecord("tiny-abc", 12.5, "REVIEW", ["rare_phrase"], {"dog": ["rare_phrase"]})]
    again = Item.from_json(item.to_json())
    assert again.to_json() == item.to_json()
    assert again.mining == item.mining and again.amg_params == {"points_per_side": 8} and again.priority == 0.4
    old = {k: v for k, v in item.to_json().items() if k not in ("failure_modes", "priority", "mining", "amg_params")}
    older = Item.from_json(old)  # a manifest of a version before active mining
    assert (older.failure_modes, older.priority, older.mining, older.amg_params) == ([], None, [], None)
    proto = item.to_proto()
    assert proto.stage == 2 and proto.phrases[1].is_negative and proto.phrases[0].state == int(S.REVIEW)


@pytest.mark.parametrize("value, stage", [(0, Stage.FULLY_AUTOMATIC), ("semi_automatic", Stage.SEMI_AUTOMATIC),
                                          ("1", Stage.ASSISTED_MANUAL), ("STAGE_FULLY_AUTOMATIC", Stage.FULLY_AUTOMATIC)])
def test_stage_parsing(value, stage):
    assert Stage.parse(value) == stage


def test_unknown_stage_and_state_name_the_value():
    with pytest.raises(InvalidInput, match="'stage9'"):
        Stage.parse("stage9")
    with pytest.raises(InvalidInput, match="'nope'"):
        ItemState.parse("nope")
    with pytest.raises(InvalidInput, match="malformed item manifest"):
        Item.from_json({"item_id": "x"})
