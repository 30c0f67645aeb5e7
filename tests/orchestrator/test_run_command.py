"""`dataengine run IMAGES --out OUT`: the whole engine in one process, then the exports; started
again on the same OUT it redoes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from services.app.cli import app

GRID = '{"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}'


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(d / "sub" / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(d / "sub" / "gray.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "empty.jpg").write_bytes(b"")
    return d


def run(folder, out, checkpoint):
    return CliRunner().invoke(app, ["run", str(folder), "--out", str(out), "--model-type", "tiny",
                                    "--checkpoint", str(checkpoint), "--label", "dog", "--amg-params", GRID])


def test_run_writes_the_exports_and_a_report_of_every_file(folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    result = run(folder, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    files = {r["file"]: r for r in report["items"]}
    assert sorted(files) == ["a.png", "broken.png", "empty.jpg", "sub/b.jpg", "sub/gray.png"]
    assert files["broken.png"]["state"] == "failed" and "broken.png" in files["broken.png"]["reason"]
    assert files["empty.jpg"]["state"] == "failed" and "empty" in files["empty.jpg"]["reason"]
    good = [f for f in files.values() if f["state"] != "failed"]
    assert len(good) == 3 and all(f["state"] in ("accepted", "review", "rejected") for f in good)

    coco = COCO(str(out / "coco.json"))
    assert sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds())) == ["a.png", "sub/b.jpg", "sub/gray.png"]
    assert all(i["image_level_labels"] == ["dog"] for i in coco.loadImgs(coco.getImgIds()))
    # the default concepts backend (ontology) contrasts "dog" with its relatives, never itself or a parent
    negatives = {n for i in coco.loadImgs(coco.getImgIds()) for n in i["negative_phrases"]}
    assert {"wolf", "cat"} <= negatives and not negatives & {"dog", "animal", "mammal", "canine"}
    assert sorted(p.name for p in (out / "sa1b").iterdir()) == ["a.json", "b.json", "gray.json"]
    gray = json.loads((out / "sa1b" / "gray.json").read_text())
    assert (gray["image"]["height"], gray["image"]["width"]) == (20, 24)
    saco = json.loads((out / "saco.json").read_text())
    positives = [p for p in saco["pairs"] if not p["is_negative"]]
    assert sorted(p["image"]["source"] for p in positives) == ["a.png", "sub/b.jpg", "sub/gray.png"]
    assert all(p["phrase"] == "dog" and p["grounded"] is False for p in positives)
    assert {p["phrase"] for p in saco["pairs"] if p["is_negative"]} == negatives

    # again on the same OUT: nothing is redone, the report is the same
    manifests = {p: p.stat().st_mtime_ns for p in (out / ".dataengine" / "items").rglob("*.json")}
    again = run(folder, out, tiny_checkpoint)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests
    assert json.loads((out / "report.json").read_text())["items"] == report["items"]


@pytest.mark.parametrize("args, message", [
    (["run", "nowhere", "--out", "o"], "does not exist"),
    (["run", ".", "--out", "o", "--stage", "7"], "unknown stage"),
    (["run", ".", "--out", "o", "--amg-params", "{points"], "not JSON"),
    (["run", ".", "--out", "o", "--amg-params", '{"points_per_side": 0}'], "points_per_side"),
])
def test_run_names_bad_arguments(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and message in result.output, result.output


def test_a_file_name_that_is_not_utf8_fails_nothing(tmp_path, tiny_checkpoint):
    import os

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / "good.png")
    odd = os.path.join(os.fsencode(folder), b"bad\xff\xfename.png")
    with open(odd, "wb") as f:
        f.write((folder / "good.png").read_bytes()[:-8] + b"12345678")  # another file, same picture
    out = tmp_path / "out"
    result = run(folder, out, tiny_checkpoint)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    files = {r["file"]: r for r in report["items"]}
    assert set(files) == {"good.png", "bad\\xff\\xfename.png"}  # the odd bytes shown escaped
    assert files["good.png"]["state"] != "failed"
    assert files["bad\\xff\\xfename.png"]["item_id"]  # it became an item like any file
