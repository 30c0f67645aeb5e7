"""Calibration of the heuristic verifier: the fit repairs a known mis-calibration, the file round
trips and is loaded through the settings (a version-1 file scores as it always did), bad files and
bad training data are refused by name, training examples are read from reviewed manifests, and
`dataengine calibrate` ties it together. The MV/EV loop with held-out figures:
test_calibration_loop.py."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import sa1b_document
from services.common.settings import Settings
from services.common.storage import LocalStore
from services.orchestrator.model import Item, ItemState, PhraseResult, manifest_key
from services.app.calibrate_command import register
from services.verifier.calibration import Calibration, CalibrationFile, Examples, brier, ece, fit
from services.app.calibration_data import examples_from_jsonl, examples_from_store
from services.verifier.core import PhrasePair, VerifierCore
from services.app.eval_commands import register as register_eval
from services.verifier.heuristic import FEATURES, HeuristicVerifier, logit
from tests.verifier.test_verifier import SIZE, drawn, mask

AREA = 9 / (SIZE[0] * SIZE[1])  # area fraction of every ``mask``


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _hand_made() -> Calibration:
    """p = sigmoid(-1 + 0.5 raw_logit + 2 area_fraction): two features, so their order matters."""
    coefficients = {name: 0.0 for name in FEATURES} | {"raw_logit": 0.5, "area_fraction": 2.0}
    return Calibration(tuple(coefficients[f] for f in FEATURES), -1.0, {"n": 10, "accepted": 5, "discarded": 5})


def v1_document(calibration: Calibration) -> dict:
    """``calibration`` as a version-1 file (one model, written before per-check models) held it."""
    return {"kind": "dataengine.verifier.calibration", "version": 1, "backend": "heuristic", "formula_version": 2,
            "features": list(FEATURES), "coefficients": list(calibration.coefficients),
            "intercept": calibration.intercept, "counts": calibration.counts, "ece_bins": 10, "metrics": {}}


def _distorted(n: int, seed: int = 0) -> tuple[Examples, np.ndarray]:
    """Examples whose raw score r is over-confident: a human accepts with probability r**3 (the
    known distortion). Returns them and r."""
    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.02, 0.98, n)
    x = np.zeros((n, len(FEATURES)))
    x[:, 0] = [logit(r) for r in raw]
    x[:, 1:4] = rng.uniform(0.0, 1.0, (n, 3))  # noise features the fit should not need
    return Examples(x, rng.random(n) < raw ** 3), raw


# -- metrics and fit --------------------------------------------------------------------------

def test_ece_and_brier_on_a_hand_computed_case():
    p, y = np.array([0.05, 0.15, 0.95, 1.0]), np.array([0, 1, 1, 1])
    # bins [0, .1): |0.05 - 0|; [.1, .2): |0.15 - 1|; [.9, 1]: |0.975 - 1|, weighted 1/4, 1/4, 2/4
    assert ece(p, y) == pytest.approx(0.25 * 0.05 + 0.25 * 0.85 + 0.5 * 0.025)
    assert brier(p, y) == pytest.approx((0.05 ** 2 + 0.85 ** 2 + 0.05 ** 2 + 0) / 4)
    assert ece(np.array([0.3, 0.7]), np.array([0, 1]), bins=1) == 0.0  # one bin: only the mean matters


def test_fit_repairs_a_known_monotone_distortion():
    examples, _ = _distorted(2000)
    calibration, report = fit(examples)
    assert report["n"] == 2000 and report["accepted"] + report["discarded"] == 2000
    assert report["before"]["ece"] > 0.15  # r**3 vs r: the raw score is far off
    assert report["after"]["ece"] < 0.05 and report["after"]["ece"] < report["before"]["ece"]
    assert report["after"]["brier"] < report["before"]["brier"]
    assert report["after_cv"]["ece"] < report["before"]["ece"]  # also on held-out folds
    # the learned map is close to the distortion on fresh raw scores (logistic in logit(r) only
    # approximates r**3) and leans on raw_logit, not on the noise
    grid = np.linspace(0.05, 0.95, 19)
    fresh = np.zeros((19, len(FEATURES)))
    fresh[:, 0] = [logit(r) for r in grid]
    fresh[:, 1:4] = 0.5
    assert np.abs(calibration.probabilities(fresh) - grid ** 3).max() < 0.08
    assert abs(calibration.coefficients[0]) > 5 * max(abs(c) for c in calibration.coefficients[1:])
    assert calibration.metrics == report


@pytest.mark.parametrize("n, accepted, phrase", [
    (9, 4, "at least 10 reviewed items, got 9"),  # too few
    (12, 12, "all 12 reviewed items were accepted"),  # one class
    (12, 0, "all 12 reviewed items were discarded"),
])
def test_fit_refuses_too_little_or_one_sided_data(n, accepted, phrase):
    examples = Examples(np.zeros((n, len(FEATURES))), np.arange(n) < accepted)
    with pytest.raises(FailedPrecondition, match=re.escape(phrase)):
        fit(examples)


def test_small_sets_get_no_cross_validation():
    examples, _ = _distorted(40, seed=1)
    examples.accepted[:] = np.arange(40) < 4  # 4 accepted: fewer than 5 folds' worth
    assert fit(examples)[1]["after_cv"] is None


# -- the file ---------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path):
    calibration = CalibrationFile({"item": fit(_distorted(200)[0])[0], "mask": _hand_made()}, {"holdout": 0.2})
    path = tmp_path / "sub" / "calibration.json"
    calibration.save(path)
    assert CalibrationFile.load(path) == calibration
    doc = json.loads(path.read_text())
    assert doc["version"] == 2 and doc["features"] == list(FEATURES) and doc["ece_bins"] == 10
    assert doc["models"]["item"]["counts"]["n"] == 200 and set(doc["models"]) == {"item", "mask"}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("version", [1, 2])
def test_features_in_another_order_are_matched_by_name(tmp_path, version):
    doc = v1_document(_hand_made()) if version == 1 else CalibrationFile({"exhaustivity": _hand_made()}).to_json()
    model = doc if version == 1 else doc["models"]["exhaustivity"]
    doc["features"], model["coefficients"] = doc["features"][::-1], model["coefficients"][::-1]
    (tmp_path / "c.json").write_text(json.dumps(doc))
    loaded = CalibrationFile.load(tmp_path / "c.json")
    assert list(loaded.models) == ["item" if version == 1 else "exhaustivity"]
    assert next(iter(loaded.models.values())).coefficients == _hand_made().coefficients


def test_a_version_1_file_still_scores_every_check_with_its_one_model(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(v1_document(_hand_made())))
    settings = Settings(store="local", store_root=tmp_path / "store", verifier_calibration=path)
    pairs = [PhrasePair("car", [mask(0.9, 0.9), mask(0.5, 1.0, seed=3)]), PhrasePair("sky"),
             PhrasePair("truck", is_negative=True)]
    grid = [mask(1.0, 1.0, seed=5)]
    for core in (VerifierCore.from_settings(settings), VerifierCore("heuristic", settings=settings)):
        result = core.verify(pairs, grid)
        car, sky, truck = result.pairs
        expected = [_sigmoid(-1 + 0.5 * logit(r) + 2 * AREA) for r in (0.81, 0.5)]
        assert [v.score for v in car.verdicts] == pytest.approx(expected)
        assert [v.choice for v in car.verdicts] == ["reject", "reject"]  # both below 0.5 once calibrated
        assert {v.source for v in car.verdicts} == {"heuristic+calibration"}
        # the pair: the calibration of its own features (mean raw 0.655), not the mean of the above
        assert car.score == pytest.approx(_sigmoid(-1 + 0.5 * logit(0.655) + 2 * AREA))
        assert sky.score == pytest.approx(_sigmoid(-1 + 0.5 * logit(1.0) + 2 * AREA))  # the grid's
        assert truck.score == 0.5  # the abstaining prior is not calibrated
        assert result.score == pytest.approx(min(car.score, sky.score))
    raw = VerifierCore("heuristic", settings=Settings(store="local", store_root=tmp_path / "store"))
    assert raw.verify(pairs, grid).pairs[0].score == pytest.approx(0.655)


def _good() -> dict:
    return v1_document(_hand_made())


def _good_v2(**models) -> dict:
    return {**CalibrationFile({"item": _hand_made()}).to_json(), **({"models": models} if models else {})}


# the file's text (None: no file) -> a phrase the error must contain
BAD_FILES = {
    "missing": (None, "cannot read it"),
    "not JSON": ("{", "is not JSON"),
    "a list": ("[]", "not a calibration file"),
    "another kind": (json.dumps({**_good(), "kind": "x"}), "not a calibration file"),
    "future format": (json.dumps({**_good(), "version": 3}), "format version 3"),
    "v2 without models": (json.dumps({**_good_v2(), "models": {}}), "'models' must map some of"),
    "v2 unknown model": (json.dumps(_good_v2(colour=_hand_made().to_json())), "'models' must map some of"),
    "v2 model not an object": (json.dumps(_good_v2(mask=[1.0])), "model 'mask' is not an object"),
    "v2 short model": (json.dumps(_good_v2(mask={**_hand_made().to_json(), "coefficients": [1.0]})),
                       "model 'mask': 'coefficients'"),
    "another backend": (json.dumps({**_good(), "backend": "openai"}), "for backend 'openai'"),
    "old formula": (json.dumps({**_good(), "formula_version": 1}), "heuristic formula version 1"),
    "a feature missing": (json.dumps({**_good(), "features": list(FEATURES[:-1])}), "its features are"),
    "an unknown feature": (json.dumps({**_good(), "features": [*FEATURES[:-1], "colour"]}), "its features are"),
    "too few coefficients": (json.dumps({**_good(), "coefficients": [1.0]}), "'coefficients'"),
    "NaN coefficient": (json.dumps({**_good(), "coefficients": [math.nan] * len(FEATURES)}), "'coefficients'"),
    "text intercept": (json.dumps({**_good(), "intercept": "1"}), "'intercept'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_calibration_files_fail_naming_the_path(tmp_path, case):
    text, phrase = BAD_FILES[case]
    path = tmp_path / "calibration.json"
    if text is not None:
        path.write_text(text)
    settings = Settings(store="local", store_root=tmp_path / "store", verifier_calibration=path)
    with pytest.raises(FailedPrecondition, match=re.escape(str(path))) as err:
        VerifierCore.from_settings(settings)
    assert phrase in str(err.value)


# -- training data ----------------------------------------------------------------------------

def _jsonl(path, records) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


def test_jsonl_records_become_examples(tmp_path):
    record = {name: 0.25 for name in FEATURES}
    _jsonl(tmp_path / "t.jsonl", [{**record, "accepted": True}, "", {**record, "raw_logit": -2, "accepted": False}])
    examples = examples_from_jsonl(tmp_path / "t.jsonl")
    assert examples.features.shape == (2, len(FEATURES)) and examples.features[1, 0] == -2
    assert examples.accepted.tolist() == [True, False] and examples.sources == {"jsonl": 2}


@pytest.mark.parametrize("line, phrase", [
    ("{", ":1 is not JSON"),
    (json.dumps({name: 0.0 for name in FEATURES}), ":1 needs an object with 'accepted'"),  # no label
    (json.dumps({**{name: 0.0 for name in FEATURES}, "accepted": 1}), "'accepted'"),  # not a bool
    (json.dumps({"accepted": True}), ":1 needs feature 'raw_logit'"),
    (json.dumps({**{name: 0.0 for name in FEATURES}, "log1p_holes": None, "accepted": True}), "feature 'log1p_holes'"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, phrase):
    _jsonl(tmp_path / "t.jsonl", [line])
    with pytest.raises(InvalidInput, match=re.escape(phrase)):
        examples_from_jsonl(tmp_path / "t.jsonl")


def _item(store, item_id: str, state: ItemState, masks, reviewer: str = "ann", score: float | None = 0.8,
          provenance: str = "labels", **fields) -> Item:
    item = Item(item_id, "src", "images/x", "x", state=state, reviewer=reviewer, score=score,
                phrases=[PhraseResult("car", masks=list(masks), provenance=provenance),
                         PhraseResult("truck", is_negative=True)], **fields)
    store.put(manifest_key(item_id), json.dumps(item.to_json()).encode())
    return item


def _reviewed(store, n: int = 14) -> None:
    """``n`` reviewed items whose one mask's IoU rises with k; humans accept most good ones."""
    for k in range(n):
        iou = 0.3 + 0.05 * k
        accepted = (iou >= 0.6) != (k in (3, 10))  # two disagreements: not perfectly separable
        _item(store, f"r{k}", ItemState.ACCEPTED if accepted else ItemState.DISCARDED, [mask(iou, 1.0)])


def test_examples_come_from_items_a_human_reviewed_after_the_verifier(local_store):
    verifier = HeuristicVerifier()
    _item(local_store, "accepted", ItemState.ACCEPTED, [mask(0.9, 1.0)])
    _item(local_store, "discarded", ItemState.DISCARDED, [mask(0.4, 1.0)])
    _item(local_store, "auto", ItemState.ACCEPTED, [mask(0.95, 1.0)], reviewer="")  # the verifier's own call
    _item(local_store, "waiting", ItemState.REVIEW, [mask(0.8, 1.0)])  # claimed, not decided
    _item(local_store, "stage1", ItemState.ACCEPTED, [mask(0.8, 1.0)], score=None)  # never scored
    # a reviewer replaced the phrases: the features come from what the verifier saw (the decode output)
    local_store.put("items/edited/decode.json", DecodeOutput("masks/g.json", [
        GroundedPhrase("car", False, [mask(0.6, 1.0)], True, "labels")]).to_bytes())
    local_store.put("masks/g.json", json.dumps(sa1b_document("x", SIZE, [mask(0.7, 1.0, seed=4)])).encode())
    _item(local_store, "edited", ItemState.ACCEPTED, [drawn(np.ones(SIZE, bool))], provenance="human:ann",
          outputs={"decode": "items/edited/decode.json"}, grid_masks_key="masks/g.json")
    _item(local_store, "edited-gone", ItemState.ACCEPTED, [mask(0.9, 1.0)], provenance="human:ann",
          outputs={"decode": "items/edited-gone/decode.json"})
    _item(local_store, "label-only", ItemState.DISCARDED, [])  # an ungroundable label decides: score 0 by rule
    _item(local_store, "nan", ItemState.ACCEPTED, [mask(math.nan, 1.0)])  # a broken model's output
    local_store.put(manifest_key("broken"), b"{not json")
    local_store.put("items/accepted/verify.json", b"{}")  # not a manifest: ignored
    examples = examples_from_store(local_store, verifier)
    assert examples.accepted.tolist() == [True, False, True]  # accepted, discarded, edited (key order)
    assert examples.features[:, 0] == pytest.approx([logit(0.9), logit(0.4), logit(0.6)])
    assert examples.features[2] == pytest.approx(verifier.item_features([PhrasePair("car", [mask(0.6, 1.0)])], []))
    assert examples.sources == {"store": 3}
    assert examples.skipped == {"not reviewed by a human": 2, "reviewed but never scored by the verifier": 1,
                                "phrases replaced by a human and the decode output is gone": 1,
                                "scored by rule (an ungroundable label)": 1, "malformed manifest": 1,
                                "malformed decode output or masks": 1}


# -- the command ------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called by its name as under `dataengine`
    register(app)
    return app


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store")}


def test_calibrate_fits_on_the_stores_reviews_and_the_verifier_loads_it(app, env, tmp_path):
    settings = Settings(store="local", store_root=tmp_path / "store")
    store = LocalStore(settings.store_root / settings.bucket)
    _reviewed(store)
    _item(store, "auto", ItemState.ACCEPTED, [mask(0.95, 1.0)], reviewer="")
    out = tmp_path / "calibration.json"
    # 14 reviews are too few to hold some out: fit on all of them, as before held-out splits
    result = runner.invoke(app, ["calibrate", "--out", str(out), "--labels", "items", "--holdout", "0"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    item = report["checks"]["item"]
    assert (item["n"], item["accepted"], item["discarded"]) == (14, 8, 6) and item["held_out"] is None
    assert report["sources"] == {"store": 14} and report["skipped"] == {"store": {"not reviewed by a human": 1}}
    assert report["ece_bins"] == 10 and report["out"] == str(out) and report["holdout"] == 0
    assert item["train"]["after"]["brier"] < item["train"]["before"]["brier"]
    assert report["applies"] == {"item": "item", "mask": "item", "exhaustivity": "item"}  # one model scores all
    calibration = CalibrationFile.load(out)
    assert list(calibration.models) == ["item"]
    assert calibration.models["item"].counts == {"n": 14, "accepted": 8, "discarded": 6}
    core = VerifierCore.from_settings(settings.model_copy(update={"verifier_calibration": out}))
    pairs = [PhrasePair("car", [mask(0.5, 1.0)])]
    assert core.verify(pairs).score == pytest.approx(
        calibration.models["item"].probability(HeuristicVerifier().item_features(pairs, [])))


def test_calibrate_adds_jsonl_records_to_the_store_or_replaces_it(app, env, tmp_path):
    examples, _ = _distorted(30)
    records = [{**dict(zip(FEATURES, map(float, x))), "accepted": bool(y)}
               for x, y in zip(examples.features, examples.accepted)]
    _jsonl(tmp_path / "t.jsonl", records)
    _reviewed(LocalStore(tmp_path / "store" / "dataengine"))
    out = str(tmp_path / "c.json")
    jsonl = ["--items", str(tmp_path / "t.jsonl"), "--holdout", "0"]
    only = runner.invoke(app, ["calibrate", "--out", out, *jsonl], env=env)
    assert only.exit_code == 0, only.output
    assert json.loads(only.stdout)["sources"] == {"jsonl": 30}
    both = runner.invoke(app, ["calibrate", "--out", out, *jsonl, "--store", "--labels", "items"], env=env)
    assert both.exit_code == 0, both.output
    report = json.loads(both.stdout)
    assert report["checks"]["item"]["n"] == 44 and report["sources"] == {"store": 14, "jsonl": 30}


@pytest.mark.parametrize("args, code, phrase", [
    (["--no-store"], 2, "nothing to fit on"),
    ([], 1, "at least 10 reviewed items, got 3"),  # the store has only three reviews
    (["--labels", "items,colour"], 2, "--labels must be a comma list of items, masks, phrases"),
    (["--holdout", "1"], 2, "--holdout must be in [0, 1), got 1.0"),
    (["--items", "nowhere.jsonl"], 1, "cannot read training items nowhere.jsonl"),
])
def test_calibrate_fails_clearly(app, env, tmp_path, args, code, phrase):
    store = LocalStore(tmp_path / "store" / "dataengine")
    for k in range(3):
        _item(store, f"r{k}", ItemState.ACCEPTED, [mask(0.9, 1.0)])
    out = tmp_path / "c.json"
    result = runner.invoke(app, ["calibrate", "--out", str(out), *args], env=env)
    assert result.exit_code == code
    assert phrase in " ".join(result.output.split())  # rich may wrap long lines
    assert not out.exists()


def test_eval_routing_reads_the_items_humans_reviewed_after_the_verifier(env, tmp_path):
    store = LocalStore(tmp_path / "store" / "dataengine")
    for name, score, state in [("a", 0.95, ItemState.ACCEPTED), ("b", 0.93, ItemState.DISCARDED),
                               ("c", 0.8, ItemState.ACCEPTED), ("d", 0.5, ItemState.DISCARDED),
                               ("e", 0.6, ItemState.ACCEPTED)]:
        _item(store, name, state, [mask(0.9, 1.0)], score=score)
    _item(store, "auto", ItemState.ACCEPTED, [mask(0.95, 1.0)], reviewer="", score=0.95)  # no human decision
    _item(store, "stage1", ItemState.ACCEPTED, [mask(0.8, 1.0)], score=None)  # never scored
    app = typer.Typer()
    app.callback()(lambda: None)
    register_eval(app)
    result = runner.invoke(app, ["eval-routing"], env=env)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n"] == 5 and report["sources"] == {"store": 5}
    assert report["auto_accept"] == {"precision": 0.5, "recall": 1 / 3}  # a, b accepted; a, c, e by humans
    assert report["auto_reject"] == {"precision": 0.5, "recall": 0.5}  # d, e rejected; b, d by humans
    assert report["routed"]["review"] == {"n": 1, "human_accepted": 1, "human_rejected": 0}
    nothing = runner.invoke(app, ["eval-routing", "--no-store"], env=env)
    assert nothing.exit_code == 2 and "nothing to evaluate" in nothing.output
