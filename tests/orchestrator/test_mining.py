"""Active mining: the failure modes of an item routed to a human (from the verifier's verdicts and
the data), the review queue ordered by the configurable priority over them, the phrase sets the
rare phrases are counted from (Redis and memory), and ``dataengine mining``'s report, its change
since the last model included, after a rerun with a fine-tuned decoder.

Routing runs the real step handlers on the tiny SAM in the embedded engine; the verifier's
verdicts are scripted per phrase (random weights cannot judge), and in the last test they prefer
the fine-tuned decoder's masks, as a better decoder would earn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from services.app.cli import app
from services.common.errors import InvalidInput
from services.common.failure_modes import FAILURE_MODES, MiningPolicy
from services.common.decoded import DecodeOutput
from services.common.masks import MaskRecord
from services.common.sam_models import load_sam
from services.common.settings import Settings
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.concepts import step as concepts_step
from services.concepts.core import ConceptsCore
from services.app.embedded import EmbeddedEngine
from services.orchestrator.index import MemoryIndex, RedisIndex
from services.orchestrator.mining import phrase_modes
from services.orchestrator.model import DECODE, PROPOSE, VERIFY, Item, ItemState, PhraseResult, Stage
from services.verifier import step as verifier_step
from services.verifier.core import VerifierCore
from tests.decoder.test_model_identity import fine_tuned_copy
from tests.orchestrator.test_engine import GRID, BoxConcepts

PIXELS = 40 * 56


def queue(index) -> list[tuple[str, float]]:
    """The free review queue, every stage merged, lowest rank first."""
    return sorted((e for stage in Stage for e in index.free(stage, 0, 10_000)), key=lambda e: (e[1], e[0]))


def mask(area: int) -> MaskRecord:
    return MaskRecord(segmentation={}, bbox=[0.0, 0.0, 1.0, 1.0], area=area, predicted_iou=0.9, stability_score=0.9)


def phrase(verdicts, masks=(500,), negative=False) -> PhraseResult:
    return PhraseResult("cat", is_negative=negative, masks=[] if negative else [mask(a) for a in masks],
                        verdicts=[Verdict(c, ch, s, "test", "cat") for c, ch, s in verdicts])


GOOD = [("mask", "accept", 0.95), ("exhaustivity", "accept", 0.95)]


@pytest.mark.parametrize("result, carriers, modes", [
    (phrase(GOOD), 10, []),
    (phrase([("mask", "accept", 0.69), ("exhaustivity", "accept", 0.95)]), 10, ["low_mask_quality"]),
    (phrase([("mask", "accept", 0.7), ("exhaustivity", "accept", 0.95)]), 10, []),  # the bar itself passes
    (phrase([("mask", "accept", 0.95), ("exhaustivity", "accept", 0.85)]), 10, ["exhaustivity_doubt"]),
    (phrase([("mask", "accept", 0.95), ("exhaustivity", "reject", 0.95)]), 10, ["exhaustivity_doubt"]),
    (phrase([("exhaustivity", "ungroundable", 0.0)], masks=()), 10, ["ungroundable_phrase"]),
    (phrase([], masks=()), 10, ["ungroundable_phrase"]),  # a label no backend could ground
    (phrase([("hard_negative", "present", 0.9)], negative=True), 10, ["hard_negative_present"]),
    (phrase([("hard_negative", "review", 0.4)], negative=True), 10, ["hard_negative_present"]),
    (phrase([("hard_negative", "absent", 0.9)], negative=True), 0, []),  # negatives: never rare nor ungrounded
    (phrase(GOOD, masks=(500, 2)), 10, ["small_objects"]),  # 2 px < 0.001 of 2240 px
    (phrase(GOOD, masks=(500, 3)), 10, []),
    (phrase(GOOD), 2, ["rare_phrase"]),
    (phrase(GOOD), 3, []),
    (phrase([("mask", "reject", 0.1), ("exhaustivity", "accept", 0.5)], masks=(1,)), 1,
     ["low_mask_quality", "exhaustivity_doubt", "small_objects", "rare_phrase"]),
])
def test_phrase_failure_modes_follow_the_documented_bars(result, carriers, modes):
    assert phrase_modes(result, MiningPolicy(), PIXELS, carriers) == modes


def test_priority_stays_in_its_band_and_without_mode_weights_is_the_score_order():
    rng = np.random.default_rng(0)
    plain = MiningPolicy(weights={m: 0.0 for m in FAILURE_MODES})
    for _ in range(200):
        score = float(rng.uniform(0, 1))
        modes = [m for m in FAILURE_MODES if rng.uniform() < 0.4]
        it = Item("x", "x.png", "k", "x", state=ItemState.REJECTED, score=score,
                  priority=MiningPolicy().urgency(score, modes))
        assert 2.0 <= it.queue_rank <= 3.0  # the fix band, never the audit band's
        it.priority = plain.urgency(score, modes)
        assert it.queue_rank == pytest.approx(2.0 + score)
    assert MiningPolicy().urgency(0.8, ["rare_phrase"]) > MiningPolicy().urgency(0.7, [])


def test_bad_mining_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown mining weight 'rare'"):
        Settings(mining_weights={"rare": 1.0})
    with pytest.raises(InvalidInput, match="'crowded_scene' must be a finite number >= 0"):
        MiningPolicy(weights={"crowded_scene": -1.0})
    assert Settings(mining_weights={"rare_phrase": 3}).mining_weights == {"rare_phrase": 3.0}


@pytest.fixture(params=["redis", "memory"])
def index(request):
    return MemoryIndex() if request.param == "memory" else RedisIndex(request.getfixturevalue("broker"))


def test_phrase_sets_count_each_item_once_and_survive_clear(index):
    index.put_phrases("a", ["cat", "dog"])
    index.put_phrases("a", ["cat"])  # a redelivered report, a rerun, a rebuild
    index.put_phrases("b", ["cat", "a cat's tail: ünïcode"])
    index.clear()
    assert index.carriers(["cat", "dog", "a cat's tail: ünïcode", "cow"]) == {
        "cat": 2, "dog": 1, "a cat's tail: ünïcode": 1, "cow": 0}


# -- in the engine ------------------------------------------------------------------------------

class VerdictsVerifier:
    """Verdicts per phrase: phrase -> (pair score, [(check, choice, score)]). ``better``: a decoder
    id whose masks earn a pair score of 0.95 and a clean mask verdict instead."""

    name = "scripted"
    needs_pixels = False

    def __init__(self, plan: dict, better: str = "") -> None:
        self.plan, self.better = plan, better

    def verify(self, pixels, pairs, grid_masks, checks) -> Verification:
        results = []
        for p in pairs:
            score, verdicts = self.plan[p.phrase]
            if self.better and p.masks and all(m.source == f"sam1:{self.better}" for m in p.masks):
                score, verdicts = 0.95, [("mask", "accept", 0.95)]
            results.append(PairVerdict(p.phrase, p.is_negative, score,
                                       [Verdict(c, ch, s, self.name, p.phrase) for c, ch, s in verdicts],
                                       mask_count=len(p.masks)))
        positives = [r.score for r in results if not r.is_negative]
        return Verification(results, min(positives) if positives else 0.0)


PLAN = {"cat": (0.75, [("mask", "accept", 0.75)]), "zebra": (0.85, [("mask", "accept", 0.85)]),
        "dog": (0.5, [("mask", "reject", 0.5)]), "cow": (0.95, [("mask", "accept", 0.95)]),
        "unicorn": (0.9, [("hard_negative", "absent", 0.9)])}


def engine_on(out, sam, verifier, **settings) -> EmbeddedEngine:
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID, concepts_backend="labels", **settings),
                            out, sam=sam)
    engine.dispatcher.sleep = lambda s: None
    engine.dispatcher.handlers[VERIFY] = verifier_step.make_handler(VerifierCore(verifier, engine.store), engine.store)
    engine.dispatcher.handlers[PROPOSE] = concepts_step.make_handler(ConceptsCore(BoxConcepts(), engine.store),
                                                                     engine.store)
    return engine


def route(tmp_path, tiny_sam, labels: dict[str, list[str]], **settings):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    engine = engine_on(out, tiny_sam, VerdictsVerifier(PLAN), **settings)
    ids = {}
    for name, phrases in labels.items():
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"{name}.png")
        ids[name] = engine.process(folder / f"{name}.png", f"{name}.png", phrases, Stage.FULLY_AUTOMATIC).item_id
    return engine, ids, out


def claim_order(engine, n: int) -> list[str]:
    order = []
    for i in range(n):
        got = engine.orchestrator.next_review(f"annotator{i}")
        order.append(got.item_id)
    return order


LABELS = {"c0": ["cat"], "c1": ["cat"], "c2": ["cat"], "z": ["zebra"]}


def rare_count() -> float:
    return REGISTRY.get_sample_value("dataengine_failure_modes_total", {"mode": "rare_phrase"}) or 0.0


def test_routed_items_get_their_failure_modes_and_the_queue_puts_the_rare_phrase_first(tmp_path, tiny_sam):
    before = rare_count()
    engine, ids, _ = route(tmp_path, tiny_sam, LABELS)
    assert rare_count() - before == 3  # the operators' view (Prometheus)
    items = {n: engine.orchestrator.load(i) for n, i in ids.items()}
    # Carriers counted as they are routed: the first two cats and the one zebra are rare (< 3 items).
    assert {n: it.failure_modes for n, it in items.items()} == {
        "c0": ["rare_phrase"], "c1": ["rare_phrase"], "c2": [], "z": ["rare_phrase"]}
    assert all(it.state == ItemState.REVIEW and len(it.mining) == 1 for it in items.values())
    assert items["z"].mining[0].phrases == {"zebra": ["rare_phrase"]}
    order = claim_order(engine, 4)
    # zebra (0.85, rare) before the common cat (0.75): by score alone it would be last.
    assert order.index(ids["z"]) < order.index(ids["c2"]), order
    assert order[-1] == ids["c2"]


def test_without_mode_weights_the_queue_is_lowest_score_first(tmp_path, tiny_sam):
    engine, ids, _ = route(tmp_path, tiny_sam, LABELS, mining_weights={m: 0 for m in FAILURE_MODES})
    assert engine.orchestrator.load(ids["z"]).failure_modes == ["rare_phrase"]  # found, but weighs nothing
    assert claim_order(engine, 4)[-1] == ids["z"]


def test_new_weights_rerank_the_waiting_items_when_the_index_is_rebuilt(tmp_path, tiny_sam):
    engine, ids, _ = route(tmp_path, tiny_sam, LABELS)
    orch = engine.orchestrator
    assert [i for i, _ in queue(orch.index)][-1] == ids["c2"]
    orch.mining = MiningPolicy(weights={m: 0.0 for m in FAILURE_MODES})  # a restart with new settings
    orch.rebuild_index()  # what `dataengine reconcile` and a restarted orchestrator do
    assert [i for i, _ in queue(orch.index)][-1] == ids["z"]
    assert orch.index.carriers(["cat", "zebra"]) == {"cat": 3, "zebra": 1}


def test_bars_from_the_settings_decide_the_data_modes(tmp_path, tiny_sam):
    engine, ids, _ = route(tmp_path, tiny_sam, {"d": ["dog", "cat"]}, mining_crowded_instances=2,
                           mining_small_area_fraction=0.9, mining_rare_phrase_items=0)
    it = engine.orchestrator.load(ids["d"])
    assert it.state == ItemState.REJECTED and it.band == "fix"
    assert it.failure_modes == ["low_mask_quality", "crowded_scene", "small_objects"], it.failure_modes
    assert it.mining[0].phrases == {"dog": ["low_mask_quality", "small_objects"], "cat": ["small_objects"]}
    # u = (1 * (1 - 0.5) + 1 + 0.25 + 0.5) / 5.75 with the default weights; rank = fix band + 1 - u
    assert it.priority == pytest.approx(2.25 / 5.75, abs=1e-6)
    assert queue(engine.orchestrator.index) == [(it.item_id, pytest.approx(3.0 - 2.25 / 5.75, abs=1e-6))]


def test_report_counts_modes_and_the_change_since_the_last_model(tmp_path, tiny_sam, tiny_checkpoint):
    labels = {"c0": ["cat"], "c1": ["cat"], "d0": ["dog"], "ok": ["cow"]}
    _, ids, out = route(tmp_path, tiny_sam, labels | {"c2": ["cat"]})
    runner = CliRunner()
    first = json.loads(runner.invoke(app, ["mining", "--run", str(out), "--json"]).stdout)
    assert first["since_last_model"] is None
    assert first["waiting"]["to_human"] == 4 and first["waiting"]["by_mode"]["low_mask_quality"] == 1
    assert first["waiting"]["by_phrase"]["cat"] == {"items": 2, "modes": {"rare_phrase": 2}}

    tuned = load_sam("tiny", fine_tuned_copy(tiny_checkpoint, tmp_path / "sam_tiny_ft.pth"))
    engine = engine_on(out, tuned, VerdictsVerifier(PLAN, better=tuned.decoder_id))
    summary = engine.rerun([ItemState.REVIEW, ItemState.REJECTED])
    assert len(summary.rerun) == 4  # "ok" (its cow scored 0.95) was accepted
    after = json.loads(runner.invoke(app, ["mining", "--run", str(out), "--json"]).stdout)
    change = after["since_last_model"]
    assert change["decoder"] == tuned.decoder_id and change["previous_decoder"] == tiny_sam.decoder_id
    assert change["items"] == 4 and change["to_human"] == {"before": 4, "now": 0}
    assert change["by_mode"]["low_mask_quality"] == {"before": 1, "now": 0, "change": -1}
    assert change["by_mode"]["rare_phrase"] == {"before": 3, "now": 0, "change": -3}
    assert after["waiting"]["to_human"] == 0
    assert list(after["decoders"]) == [tiny_sam.decoder_id, tuned.decoder_id]
    assert [(t["routed"], t["to_human"]) for t in after["decoders"].values()] == [(5, 4), (4, 0)]
    dog = engine.orchestrator.load(ids["d0"])
    assert dog.state == ItemState.ACCEPTED and dog.failure_modes == [] and dog.priority is None
    assert [r.decoder for r in dog.mining] == [tiny_sam.decoder_id, tuned.decoder_id]

    table = runner.invoke(app, ["mining", "--run", str(out)])
    assert table.exit_code == 0 and "low_mask_quality" in table.stdout and "-1" in table.stdout, table.stdout
    missing = runner.invoke(app, ["mining", "--run", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "holds no engine store" in missing.output


def test_a_crowded_grid_is_counted_from_the_decode_output(tmp_path, tiny_sam):
    engine, ids, _ = route(tmp_path, tiny_sam, {"c": ["cat"]}, mining_crowded_instances=100,
                           mining_crowded_grid_masks=1, mining_rare_phrase_items=0)
    orch = engine.orchestrator
    it = orch.load(ids["c"])
    decoded = DecodeOutput.from_bytes(orch.store.get(it.outputs[DECODE]))
    assert decoded.grid_count == len(orch.grid_masks(it)) >= 1  # no grid read at routing: the count travels
    assert it.failure_modes == ["crowded_scene"]
