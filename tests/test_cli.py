"""The command line: `dataengine masks`, `models fetch`, argument errors."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from services.app.cli import app
from services.common.masks import decode_rle

runner = CliRunner()


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "sub" / "b.jpg")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def test_masks_writes_one_sa1b_json_per_image_and_reports_bad_ones(image_dir, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["masks", str(image_dir), "--model-type", "tiny", "--checkpoint",
                                 str(tiny_checkpoint), "--out", str(out), "--points-per-side", "4",
                                 "--pred-iou-thresh", "0", "--stability-score-thresh", "0"])
    assert result.exit_code == 1, result.output  # the broken file fails, the others are written
    assert "broken.png" in result.output and "1 of 3 images failed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json"]
    doc = json.loads((out / "a.json").read_text())
    assert (doc["image"]["height"], doc["image"]["width"]) == (48, 64)
    assert doc["annotations"], "thresholds at 0 keep at least one mask"
    ann = doc["annotations"][0]
    assert decode_rle(ann["segmentation"]).shape == (48, 64)
    assert {"bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"} <= set(ann)


@pytest.mark.parametrize("args, message", [
    (["masks", "nowhere.png", "--out", "o"], "does not exist"),                    # missing input
    (["masks", ".", "--out", "o", "--points-per-side", "0"], "points_per_side"),   # bad parameter
    (["masks", ".", "--out", "o", "--model-type", "vit_q"], "vit_q"),              # unknown model
    (["serve", "nonsense"], "unknown service"),                                    # unknown service
])
def test_bad_arguments_name_the_problem(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert message in result.output


def test_models_fetch_offline_fails_clearly(tmp_path):
    # This machine has no route to the official host: the command must say so, not hang or trace back.
    result = runner.invoke(app, ["models", "fetch", "vit_b", "--dest", str(tmp_path)])
    assert result.exit_code == 1
    assert "vit_b" in result.output or "download" in result.output
    assert not list(tmp_path.glob("*.pth"))
