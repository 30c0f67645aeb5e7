"""The model loop from the command line, as the README documents it: `dataengine run`, humans
review in the studio's core, `train decoder`, `eval-masks`, `models promote`, `rerun`; a better
decoder goes into service and the items still waiting are decoded again with it. Promotion is
refused on worse figures (unless forced, and then recorded), across encoders (forced or not), and
for files that are no checkpoint of the model type, before anything changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from services.app.cli import app
from services.common.masks import MaskRecord, encode_rle
from services.common.promotion import HISTORY, pointer_path
from services.common.review import ReviewSubmission, ReviewedMask, ReviewedPhrase
from services.common.sam_models import file_sha256, save_random_checkpoint
from services.common.settings import Settings
from services.common.splits import held_out
from services.app.embedded import EmbeddedEngine
from services.orchestrator.model import manifest_key
from services.orchestrator.index import ids
from tests.decoder.test_finetune import shape_image

GRID = '{"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}'
IMAGES, REVIEWED = 18, 14  # the last 4 the queue hands out stay waiting


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_checkpoint):
    """A stage-2 run of 18 shape images, 14 of them reviewed by a human who drew each shape's mask;
    then `train decoder` on it. Returns the paths and ids the tests need."""
    root = tmp_path_factory.mktemp("loop")
    folder, out, models = root / "images", root / "out", root / "models"
    folder.mkdir()
    truth = {}
    for seed in range(IMAGES):
        image, mask = shape_image(seed)
        Image.fromarray(image).save(folder / f"shape-{seed}.png")
        truth[f"shape-{seed}.png"] = mask
    ran = cli("run", folder, "--out", out, "--model-type", "tiny", "--checkpoint", tiny_checkpoint, "--stage", "2",
              "--label", "shape", "--amg-params", GRID)
    assert ran.exit_code == 0, ran.output
    engine = EmbeddedEngine(Settings(model_type="tiny", checkpoint=tiny_checkpoint), out)
    engine.resume()
    reviewed = []
    for _ in range(REVIEWED):
        item = engine.orchestrator.next_review("ann")
        mask = truth[item.source]
        record = MaskRecord(encode_rle(mask), [0, 0, 1, 1], int(mask.sum()), 1.0, 1.0)
        engine.orchestrator.submit_review(ReviewSubmission(item.item_id, "ann", item.lease.token, True, [
            ReviewedPhrase("shape", "shape", masks=[ReviewedMask(record)], exhaustive=True)]))
        reviewed.append(item.item_id)
    waiting = sorted(set(list(ids(engine.orchestrator.index))) - set(reviewed))
    trained = cli("train", "decoder", "--run", out, "--out", root / "ft", "--model-type", "tiny", "--checkpoint",
                  tiny_checkpoint, "--epochs", "8", "--lr", "2e-3", "--batch-size", "1", "--holdout", "0.3")
    assert trained.exit_code == 0, trained.output
    card = json.loads(trained.stdout)
    return {"out": out, "models": models, "card": card, "tuned": root / "ft" / card["checkpoint"],
            "reviewed": reviewed, "waiting": waiting, "store": engine.store}


@pytest.fixture
def models_dir(loop, monkeypatch, tmp_path):
    """A models folder of this test's own, which the commands' settings read."""
    folder = tmp_path / "models"
    monkeypatch.setenv("DATAENGINE_MODELS_DIR", str(folder))
    monkeypatch.setenv("DATAENGINE_MODEL_TYPE", "tiny")
    monkeypatch.delenv("DATAENGINE_CHECKPOINT", raising=False)
    return folder


def pointer(models: Path) -> dict:
    return json.loads(pointer_path(models, "tiny").read_text())


def test_train_eval_promote_rerun_puts_a_better_decoder_into_service(loop, models_dir, tiny_checkpoint, tiny_sam):
    out, card = loop["out"], loop["card"]
    # Measured: held-out one-click mIoU 0.08 -> 0.95 on 2 held-out items (12 trained). Bars well below.
    before, after = card["before"]["one_click"]["miou"], card["after"]["one_click"]["miou"]
    assert after > 0.7 and after - before > 0.4, (before, after)
    assert card["held_out_items"] == sum(held_out(i, 0.3) for i in loop["reviewed"]) >= 2

    # Nothing in service yet (a tiny SAM has no official file): comparing needs --force.
    refused = cli("models", "promote", loop["tuned"], "--run", out)
    assert refused.exit_code == 1 and "cannot be loaded, so nothing to compare with" in refused.output
    assert not models_dir.exists()
    base = cli("models", "promote", tiny_checkpoint, "--run", out, "--force", "--reason", "the base, to start")
    assert base.exit_code == 0, base.output
    assert pointer(models_dir)["decoder_id"] == tiny_sam.decoder_id and "the base, to start" in pointer(models_dir)["forced"]

    promoted = cli("models", "promote", loop["tuned"], "--run", out)
    assert promoted.exit_code == 0, promoted.output
    info = json.loads(promoted.stdout)
    assert info["promoted"] and info["forced"] == "" and info["previous_decoder_id"] == tiny_sam.decoder_id
    assert info["figures"]["one_click"]["miou"] > info["previous_figures"]["one_click"]["miou"] + 0.4
    assert info["figures"] == card["after"] and info["previous_figures"] == card["before"]  # the same held-out masks
    installed = models_dir / info["checkpoint"]
    assert file_sha256(installed) == file_sha256(loop["tuned"]) == info["sha256"]
    assert json.loads(installed.with_suffix(".json").read_text())["encoder_id"] == tiny_sam.encoder_id
    assert [json.loads(line)["decoder_id"] for line in (models_dir / HISTORY).read_text().splitlines()] == [
        tiny_sam.decoder_id, info["decoder_id"]]

    # The base again is worse on the held-out masks: refused, the pointer unchanged; forced, recorded.
    kept = pointer_path(models_dir, "tiny").read_bytes()
    worse = cli("models", "promote", tiny_checkpoint, "--run", out)
    assert worse.exit_code == 1 and "not promoted: held-out one_click miou" in worse.output
    assert pointer_path(models_dir, "tiny").read_bytes() == kept
    again = cli("models", "promote", loop["tuned"], "--run", out)
    assert again.exit_code == 0 and "in service already" in again.stdout

    # rerun: the waiting items (no human settled them) are decoded with the promoted decoder.
    settled = {i: loop["store"].get(manifest_key(i)) for i in loop["reviewed"]}
    rerun = cli("rerun", "--run", out, "--state", "review", "--state", "rejected")  # the items keep their grid
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert sorted(summary["item_ids"]) == loop["waiting"] and summary["skipped"] == {}
    assert {i: loop["store"].get(manifest_key(i)) for i in loop["reviewed"]} == settled
    for item_id in loop["waiting"]:
        item = json.loads(loop["store"].get(manifest_key(item_id)))
        assert item["models"] == {"encoder": tiny_sam.encoder_id, "decoder": info["decoder_id"]}
        assert item["state"] in ("REVIEW", "REJECTED") and item["grid_masks_key"].startswith(f"masks/{info['decoder_id']}/")
    saco = json.loads((out / "saco.json").read_text())  # the exports were refreshed
    assert {p["image"]["models"].get("decoder") for p in saco["pairs"] if p["image"]["item_id"] in loop["waiting"]} \
        == {info["decoder_id"]}
    nothing = cli("rerun", "--run", out, "--state", "review", "--state", "rejected")
    assert json.loads(nothing.stdout)["rerun"] == 0

    forced = cli("models", "promote", tiny_checkpoint, "--run", out, "--force")
    assert forced.exit_code == 0 and pointer(models_dir)["forced"].startswith("--force: held-out one_click miou")


def test_promotion_refuses_other_encoders_and_bad_files_before_anything_changes(loop, models_dir, tiny_checkpoint,
                                                                                  tmp_path):
    assert cli("models", "promote", loop["tuned"], "--run", loop["out"], "--force").exit_code == 0
    kept = pointer_path(models_dir, "tiny").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(loop["tuned"].read_bytes()[:5000])
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "linear.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    cases = [
        (save_random_checkpoint("tiny", tmp_path / "other.pth", seed=5), ["--force"], "but the services' embeddings are of encoder"),
        (truncated, [], "cannot be read as a PyTorch checkpoint (truncated or not one)"),
        (tmp_path / "linear.pth", [], "is not a SAM state dict: it lacks image_encoder"),
        (tmp_path / "list.pth", [], "is not a SAM state dict (it holds a list"),
        (loop["tuned"], ["--model-type", "vit_b"], "is a tiny checkpoint, not vit_b"),
        (tmp_path / "nowhere.pth", [], "not found"),
    ]
    for path, extra, message in cases:
        result = cli("models", "promote", path, "--run", loop["out"], *extra)
        assert result.exit_code == 1 and message in " ".join(result.output.split()), (path, result.output)
        assert pointer_path(models_dir, "tiny").read_bytes() == kept
    assert sorted(p.name for p in models_dir.iterdir() if p.name.startswith(".")) == []  # no half-written file
