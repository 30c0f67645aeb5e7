"""``Orchestrator.rerun``: the items waiting for a human that no human settled or holds are decoded
and verified again with the decoder now in service, and routed anew; nothing else is touched.

The real step handlers on the tiny SAM in the embedded engine; a second engine over the same
folder runs a fine-tuned copy of the decoder (the same encoder), as after ``models promote``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidInput
from services.common.review import ReviewSubmission
from services.common.sam_models import load_sam
from services.common.settings import Settings
from services.concepts import step as concepts_step
from services.concepts.core import ConceptsCore
from services.app.embedded import EmbeddedEngine
from services.orchestrator.model import DECODE, EMBED, PROPOSE, VERIFY, ItemState, Stage, manifest_key
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.decoder.test_model_identity import fine_tuned_copy
from tests.orchestrator.test_engine import GRID, BoxConcepts, ScriptedVerifier, count_steps

SCORES = {"cat": 0.8, "dog": 0.5, "cow": 0.95, "unicorn": 0.9}  # review, fix queue, accepted; the negative


def engine_on(out, sam, amg_params=GRID) -> EmbeddedEngine:
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=amg_params, concepts_backend="labels"), out,
                            sam=sam)
    engine.dispatcher.sleep = lambda s: None
    engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(
        VerifierCore(ScriptedVerifier(SCORES), engine.store), engine.store)
    engine.dispatcher.handlers[PROPOSE] = concepts_step.make_handler(ConceptsCore(BoxConcepts(), engine.store),
                                                                     engine.store)
    return engine


@pytest.fixture
def waiting(tmp_path, tiny_sam):
    """A run folder: two items in review (one of them held by eve), one in the fix queue, one
    accepted by the machine, one a human discarded, one stage-1 item waiting for an annotator.
    Returns the folder and the item ids by those names (a, e: review, e held; b: fix queue;
    c: accepted; d: discarded; f: stage 1)."""
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    rng = np.random.default_rng(4)
    engine = engine_on(out, tiny_sam)
    ids, cats = {}, []
    for name, labels in {"c1": ["cat"], "b": ["dog"], "c": ["cow"], "c2": ["cat"], "c3": ["cat"], "f": []}.items():
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        stage = Stage.ASSISTED_MANUAL if name == "f" else Stage.FULLY_AUTOMATIC
        item_id = engine.process(folder / f"{name}.png", f"{name}.png", labels, stage).item_id
        (cats.append(item_id) if name.startswith("c") and name != "c" else ids.__setitem__(name, item_id))
    orch = engine.orchestrator
    discarded = orch.next_review("ann")  # the review band comes before stage 1 in the queue
    orch.submit_review(ReviewSubmission(discarded.item_id, "ann", discarded.lease.token, False))
    held = orch.next_review("eve")
    assert {discarded.item_id, held.item_id} < set(cats)
    ids["d"], ids["e"] = discarded.item_id, held.item_id
    (ids["a"],) = set(cats) - {discarded.item_id, held.item_id}
    return out, ids


def manifests(engine, ids) -> dict[str, bytes]:
    return {n: engine.store.get(manifest_key(i)) for n, i in ids.items()}


def test_rerun_redoes_only_unsettled_items_with_the_new_decoder(waiting, tiny_checkpoint, tiny_sam, tmp_path):
    out, ids = waiting
    tuned = load_sam("tiny", fine_tuned_copy(tiny_checkpoint, tmp_path / "sam_tiny_ft.pth"))
    engine = engine_on(out, tuned, amg_params={})  # other settings than the run's: the items keep theirs
    before = manifests(engine, ids)
    states = {n: json.loads(b)["state"] for n, b in before.items()}
    assert states == {"a": "REVIEW", "b": "REJECTED", "c": "ACCEPTED", "d": "DISCARDED", "e": "REVIEW",
                      "f": "REVIEW"}, states
    steps = count_steps(engine)
    decode = engine.dispatcher.handlers[DECODE]
    grids = []
    engine.dispatcher.handlers[DECODE] = lambda request: grids.append(request.inputs["amg_params"]) or decode(request)

    summary = engine.rerun([ItemState.REVIEW, ItemState.REJECTED])

    assert sorted(summary.rerun) == sorted([ids["a"], ids["b"]])
    assert summary.skipped == {"a human is reviewing it": 1, "assisted-manual: no machine masks to redo": 1}
    assert sorted(steps) == [DECODE, DECODE, VERIFY, VERIFY]  # embeddings and concepts reused
    assert grids == [GRID, GRID]  # the grid each item was submitted with, not the new settings' default
    after = manifests(engine, ids)
    assert {n: after[n] == before[n] for n in ids} == {"a": False, "b": False, "c": True, "d": True, "e": True,
                                                        "f": True}
    for name, state in (("a", ItemState.REVIEW), ("b", ItemState.REJECTED)):
        item = engine.orchestrator.load(ids[name])
        old = json.loads(before[name])
        assert item.state == state and item.score == SCORES[item.known_labels[0]]  # routed anew
        assert item.models == {"encoder": tiny_sam.encoder_id, "decoder": tuned.decoder_id}
        assert old["models"]["decoder"] == tiny_sam.decoder_id != tuned.decoder_id
        assert item.outputs[EMBED] == old["outputs"][EMBED] and item.outputs[PROPOSE] == old["outputs"][PROPOSE]
        assert item.grid_masks_key.startswith(f"masks/{tuned.decoder_id}/")
        assert [m.source for p in item.phrases for m in p.masks] == [f"sam1:{tuned.decoder_id}"]
        assert [h[0] for h in item.history][-4:] == ["EMBEDDED", "MASKS_DECODED", "VERIFIED", state.name]
    assert engine.orchestrator.stats().by_state == {"review": 3, "rejected": 1, "accepted": 1, "discarded": 1}

    # After the same promotion there is nothing left to redo.
    again = engine_on(out, tuned).rerun([ItemState.REVIEW, ItemState.REJECTED])
    assert again.rerun == [] and again.skipped[f"its masks are decoder {tuned.decoder_id}'s already"] == 2


def test_rerun_takes_only_the_waiting_states(tmp_path, tiny_sam):
    orch = engine_on(tmp_path / "out", tiny_sam).orchestrator
    for states in ([ItemState.ACCEPTED], [], [ItemState.REVIEW, ItemState.FAILED]):
        with pytest.raises(InvalidInput, match="rerun takes --state review and/or --state rejected"):
            orch.rerun(states)
