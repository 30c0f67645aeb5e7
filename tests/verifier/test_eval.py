"""SA-Co evaluation: our figures equal the official SAM 3 evaluator's on every recorded case
(data/saco_eval/expected.json, produced by make_cases.py), the annotator rule and the matching
behave as documented, malformed files are refused by file and field, and the routing report."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from services.common.errors import InvalidInput
from services.orchestrator.routing import Thresholds
from services.app.eval_commands import register
from services.verifier.evaluation import PairScore, evaluate, most_favourable, score_pair
from services.app.routing_eval import evaluate_routing

DATA = Path(__file__).parent / "data" / "saco_eval"
EXPECTED = json.loads((DATA / "expected.json").read_text())
CASES = EXPECTED["cases"]
TOLERANCE = 1e-4


def _paths(case: dict) -> tuple[list[Path], Path]:
    return [DATA / g for g in case["gt"]], DATA / case["pred"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_the_official_evaluator(name):
    case = CASES[name]
    ours = evaluate(*_paths(case))
    assert set(case["metrics"]) <= set(ours)
    for metric, official in case["metrics"].items():
        mine = -1.0 if ours[metric] is None else ours[metric]  # the official -1: undefined
        assert mine == pytest.approx(official, abs=TOLERANCE), metric


def test_cases_are_what_the_generator_writes(tmp_path):
    """The recorded files are the generator's output, so expected.json describes them. The random
    cases are left out: numpy does not promise the same random stream across its versions."""
    spec = importlib.util.spec_from_file_location("make_cases", DATA / "make_cases.py")
    make_cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_cases)
    files = make_cases.write_cases(tmp_path)
    assert set(files) == set(CASES)
    for name, case in files.items():
        assert case == {k: CASES[name][k] for k in ("gt", "pred")}
        if name.startswith("random_"):
            continue
        for file in case["gt"] + [case["pred"]]:
            assert (tmp_path / file).read_text() == (DATA / file).read_text(), file


def test_expected_records_its_provenance():
    assert len(EXPECTED["official_commit"]) == 40
    assert "cgf1_eval.py" in EXPECTED["note"] and "make_cases.py" in EXPECTED["command"]


def test_headline_figures_of_the_perfect_case():
    result = evaluate(*_paths(CASES["perfect"]))
    assert result["cgF1"] == pytest.approx(1.0, abs=1e-3)
    assert result["IL_counts"] == {"TP": 2, "FP": 0, "TN": 2, "FN": 0}
    assert result["pairs_evaluated"] == 4 and result["annotators"] == 1


def test_non_exhaustive_pairs_and_their_predictions_are_left_out():
    result = evaluate(*_paths(CASES["not_exhaustive"]))
    assert result["pairs_evaluated"] == 2 and result["pairs_not_exhaustive"] == 3
    assert result["predictions"] == 5 and result["predictions_evaluated"] == 1
    assert result["precision"] == pytest.approx(1.0, abs=1e-3)


def _rect(y0: int, x0: int, y1: int, x1: int) -> dict:
    """Compressed RLE of a 32x32 mask, 1 on rows y0:y1 and columns x0:x1."""
    m = np.zeros((32, 32), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    return {"size": [32, 32], "counts": mask_utils.encode(m)["counts"].decode()}


def _square(y: int, x: int) -> dict:
    return _rect(y, x, y + 10, x + 10)


def test_matching_maximises_the_summed_iou():
    """d1 fits g1 best (0.82), but d1->g2 (0.54) with d2->g1 (0.7) sums higher: both are TPs at 0.5,
    none at 0.75 (a greedy matching would give one TP at both)."""
    g1, g2 = _rect(0, 0, 10, 10), _rect(0, 4, 10, 14)
    d1, d2 = _rect(0, 1, 10, 11), _rect(0, 0, 10, 7)
    s = score_pair([g1, g2], [(d1, 0.9), (d2, 0.9)])
    assert s.tp[0] == 2 and s.tp[5] == 0 and s.fn[5] == 2


@pytest.mark.parametrize("scores, kept", [
    ([0.49999], 0),  # below the 0.5 threshold: dropped
    ([0.5], 1),  # the threshold itself is kept
    ([0.3, 0.7], 1),
])
def test_score_threshold(scores, kept):
    s = score_pair([_square(0, 0)], [(_square(0, 0), v) for v in scores])
    assert s.predicted == bool(kept) and int(s.tp[0]) == kept


def test_most_favourable_annotator():
    tn = PairScore(False, False)
    miss = score_pair([_square(0, 0)], [])
    hit = score_pair([_square(0, 0)], [(_square(0, 0), 0.9)])
    other_hit = score_pair([_square(0, 0)], [(_square(0, 0), 0.9)])
    assert most_favourable([miss, hit]) is hit
    assert most_favourable([hit, other_hit]) is hit  # a tie keeps the earlier annotator
    assert most_favourable([hit, tn]) is tn  # a true negative wins over anything
    assert most_favourable([tn, hit]) is tn


# ---- bad input -------------------------------------------------------------------------------

def _gt() -> dict:
    return {"images": [{"id": 1, "height": 32, "width": 32, "text_input": "dog", "is_instance_exhaustive": 1},
                       {"id": 2, "height": 32, "width": 32, "text_input": "cat", "is_instance_exhaustive": 1}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": _square(0, 0)}],
            "categories": [{"id": 1, "name": "object"}]}


def _pred() -> list:
    return [{"image_id": 1, "category_id": 1, "segmentation": _square(0, 0), "score": 0.9}]


def _set(path: str, value):
    """An edit setting ``doc[a][b]...`` (path "a.b.c", list indices as numbers); DELETE removes."""
    def edit(doc):
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target = doc
        for p in parents:
            target = target[p]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
        return doc
    return edit


DELETE = object()
BAD_GT = [
    # (edit of the GT document, words the error must contain)
    (lambda d: [d], ["gt.json", "JSON object"]),
    (_set("images", DELETE), ["gt.json", "'images'"]),
    (_set("categories", DELETE), ["gt.json", "'categories'"]),
    (_set("images.0.is_instance_exhaustive", DELETE), ["gt.json", "images[0].is_instance_exhaustive"]),
    (_set("images.0.is_instance_exhaustive", "yes"), ["images[0].is_instance_exhaustive"]),
    (_set("images.1.id", 1), ["images[1].id", "twice"]),
    (_set("images.0.height", 0), ["images[0].height", ">= 1"]),
    (_set("annotations.0.image_id", 7), ["annotations[0].image_id", "7"]),
    (_set("annotations.0.id", "a"), ["annotations[0].id", "integer"]),
    (_set("annotations.0.category_id", 5), ["annotations[0].category_id", "categories"]),
    (_set("annotations.0.segmentation.size", [16, 32]), ["annotations[0].segmentation.size", "[32, 32]"]),
    (_set("annotations.0.segmentation", [[1, 2, 3]]), ["annotations[0].segmentation", "polygons"]),
    (_set("annotations.0.segmentation.counts", [5, 5]), ["annotations[0].segmentation.counts", "1024"]),
    (_set("annotations.0.iscrowd", 2), ["annotations[0].iscrowd"]),
    (_set("images.0.text_input", DELETE), ["gt.json", "images[0].text_input", "noun phrase"]),  # plain COCO GT
    (_set("images.0.text_input", " "), ["images[0].text_input"]),
    (_set("annotations.0.segmentation.counts", "~~~~"), ["annotations[0].segmentation.counts", "'~'"]),
    (_set("annotations.0.segmentation.counts", "0"), ["annotations[0].segmentation.counts", "not 32x32"]),
]
BAD_PRED = [
    (lambda p: {"results": p}, ["pred.json", "JSON list"]),
    (_set("0", "x"), ["pred.json: [0]", "object"]),
    (_set("0.score", DELETE), ["pred.json: [0].score"]),
    (_set("0.score", "high"), ["[0].score", "finite number"]),
    (_set("0.image_id", 99), ["[0].image_id", "99", "not a pair"]),
    (_set("0.segmentation", DELETE), ["[0].segmentation is missing"]),
    (_set("0.segmentation", "RLE"), ["[0].segmentation", "RLE object"]),
    (_set("0.segmentation.size", [64, 64]), ["[0].segmentation.size", "disagrees", "pair 1"]),
    (_set("0.category_id", 3), ["[0].category_id", "gt.json"]),
    (_set("0.segmentation.counts", "zzzzzzzz"), ["pred.json: [0].segmentation.counts", "not a compressed RLE"]),
]


def _write(tmp_path: Path, gt=None, pred=None) -> tuple[Path, Path]:
    (tmp_path / "gt.json").write_text(json.dumps(_gt() if gt is None else gt))
    (tmp_path / "pred.json").write_text(json.dumps(_pred() if pred is None else pred))
    return tmp_path / "gt.json", tmp_path / "pred.json"


@pytest.mark.parametrize("side, edit, words", [("gt", *case) for case in BAD_GT] + [("pred", *case) for case in BAD_PRED])
def test_bad_inputs_are_refused_by_file_and_field(tmp_path, side, edit, words):
    """A broken ground truth or prediction file is InvalidInput naming the file and the field."""
    doc = copy.deepcopy(_gt() if side == "gt" else _pred())
    gt, pred = _write(tmp_path, **{side: edit(doc)})
    with pytest.raises(InvalidInput) as info:
        evaluate([gt], pred)
    for word in words:
        assert word in str(info.value)


def test_files_that_are_missing_or_not_json(tmp_path):
    gt, pred = _write(tmp_path)
    with pytest.raises(InvalidInput, match="cannot read ground truth .*nope.json"):
        evaluate([tmp_path / "nope.json"], pred)
    pred.write_text("[{")
    with pytest.raises(InvalidInput, match="predictions .*pred.json is not JSON"):
        evaluate([gt], pred)


def test_annotators_must_list_the_same_pairs(tmp_path):
    gt, pred = _write(tmp_path)
    other = _gt()
    del other["images"][1]
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(InvalidInput, match=r"b.json: pair 2 of .*gt.json is missing"):
        evaluate([gt, tmp_path / "b.json"], pred)


def test_nothing_exhaustive_to_evaluate(tmp_path):
    doc = _gt()
    for image in doc["images"]:
        image["is_instance_exhaustive"] = 0
    gt, pred = _write(tmp_path, gt=doc)
    with pytest.raises(InvalidInput, match="no exhaustively annotated pair"):
        evaluate([gt], pred)


# ---- routing ---------------------------------------------------------------------------------

ROUTING_RECORDS = [
    {"score": 0.95, "human": "accept"},  # auto-accepted, right
    {"score": 0.9, "human": "accept"},  # boundary: accepted
    {"score": 0.92, "human": "reject"},  # auto-accepted, wrong
    {"score": 0.8, "accepted": True},  # review
    {"score": 0.7, "human": "discarded"},  # boundary: review
    {"score": 0.5, "human": "reject"},  # auto-rejected, right
    {"routed": "rejected", "human": "accepted", "id": "x"},  # auto-rejected, wrong
    {"routed": "accepted", "accepted": True},
]


def _jsonl(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return path


def test_routing_precision_and_recall(tmp_path):
    report = evaluate_routing(Thresholds(0.9, 0.7), _jsonl(tmp_path, ROUTING_RECORDS))
    assert report["n"] == 8 and report["human_accepted"] == 5 and report["human_rejected"] == 3
    assert report["auto_accept"] == {"precision": 3 / 4, "recall": 3 / 5}
    assert report["auto_reject"] == {"precision": 1 / 2, "recall": 1 / 3}
    assert report["routed"]["review"] == {"n": 2, "human_accepted": 1, "human_rejected": 1}
    assert report["review_fraction"] == 2 / 8 and report["automated_accuracy"] == 4 / 6


def test_routing_thresholds_move_the_boundaries(tmp_path):
    report = evaluate_routing(Thresholds(0.95, 0.6), _jsonl(tmp_path, ROUTING_RECORDS))
    # 0.95 and the routed one accepted; 0.9, 0.92, 0.8, 0.7 review; 0.5 and the routed one rejected
    assert report["routed"]["accepted"]["n"] == 2 and report["routed"]["review"]["n"] == 4
    assert report["auto_accept"]["precision"] == 1.0


def test_routing_undefined_ratios_are_null(tmp_path):
    report = evaluate_routing(Thresholds(), _jsonl(tmp_path, [{"score": 0.8, "human": "accept"}]))
    assert report["auto_accept"] == {"precision": None, "recall": 0.0}
    assert report["auto_reject"] == {"precision": None, "recall": None}
    assert report["automated_accuracy"] is None


@pytest.mark.parametrize("line, words", [
    ("{", ["items.jsonl:1", "not JSON"]),
    ("[1]", ["items.jsonl:1", "JSON object"]),
    ('{"score": 0.9}', ["items.jsonl:1", "human decision"]),
    ('{"human": "accept"}', ["'score'", "'routed'"]),
    ('{"score": 1.5, "human": "accept", "id": "i7"}', ["items.jsonl:1 (id 'i7')", "[0, 1]"]),
    ('{"score": "high", "human": "accept"}', ["'score'"]),
    ('{"routed": "failed", "human": "accept"}', ["'routed'", "accepted, review or rejected"]),
    ('{"score": 0.5, "human": "maybe"}', ["'human'", "maybe"]),
])
def test_bad_routing_records(tmp_path, line, words):
    path = tmp_path / "items.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InvalidInput) as info:
        evaluate_routing(Thresholds(), path)
    for word in words:
        assert word in str(info.value)


def test_routing_needs_records(tmp_path):
    with pytest.raises(InvalidInput, match="no routing decisions"):
        evaluate_routing(Thresholds(), _jsonl(tmp_path, []))


# ---- commands --------------------------------------------------------------------------------

@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(map(str, args)))


def test_eval_command_prints_the_metrics(cli):
    case = CASES["annotators"]
    gts, pred = _paths(case)
    result = cli("eval", *[a for g in gts for a in ("--gt", g)], "--pred", pred)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    listed = cli("eval", "--gt", *gts, "--pred", pred)  # the files after one --gt, as the issue writes it
    assert listed.exit_code == 0 and json.loads(listed.stdout) == printed
    for metric in ("cgF1", "IL_MCC", "positive_micro_F1", "precision", "recall", "F1", "cgF1@0.5", "F1@0.75"):
        assert printed[metric] == pytest.approx(case["metrics"][metric], abs=TOLERANCE)
    assert printed["annotators"] == 3


def test_eval_command_bad_file(cli, tmp_path):
    gt, pred = _write(tmp_path, pred={"x": 1})
    result = cli("eval", "--gt", gt, "--pred", pred)
    assert result.exit_code == 1 and "JSON list" in result.output


def test_eval_routing_command(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("DATAENGINE_ACCEPT_THRESHOLD", "0.95")
    path = _jsonl(tmp_path, ROUTING_RECORDS)
    result = cli("eval-routing", "--items", path, "--review-threshold", "0.6")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["thresholds"] == {"accept": 0.95, "review": 0.6}
    assert report["routed"]["accepted"]["n"] == 2
    bad = cli("eval-routing", "--items", path, "--review-threshold", "0.99")
    assert bad.exit_code == 2 and "must not exceed" in bad.output
