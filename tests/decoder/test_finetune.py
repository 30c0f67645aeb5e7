"""Fine-tuning the decoder on human masks: it learns (held-out mIoU rises by a clear margin), it
resumes exactly where it stopped, its checkpoint loads everywhere, bad inputs are refused by name.

The data: synthetic images with one bright disc or rectangle on a dark noisy ground, the shape's
mask as the "human" mask; embeddings by the tiny SAM's own encoder (random weights: the decoder
must learn to read them, so the before/after gap is large and honest).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition
from services.common.sam_models import file_sha256, load_sam
from services.common.splits import held_out
from services.decoder.finetune import STATE_FILE, TrainConfig
from services.decoder.prompting import Example
from services.common.model_card import card_path, read_card
from services.decoder.training import train_decoder
from tests.decoder.builders import embed


def shape_image(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(96x128x3 uint8 image, 96x128 bool mask of its one shape)."""
    rng = np.random.default_rng(seed)
    h, w = 96, 128
    image = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    cx, cy = int(rng.integers(30, w - 30)), int(rng.integers(25, h - 25))
    if seed % 2:
        cv2.circle(mask, (cx, cy), int(rng.integers(10, 22)), 1, -1)
    else:
        a, b = (int(v) for v in rng.integers(10, 25, 2))
        cv2.rectangle(mask, (cx - a, cy - b), (cx + a, cy + b), 1, -1)
    image[mask > 0] = rng.integers(150, 255, 3)
    return image, mask.astype(bool)


@pytest.fixture(scope="module")
def shapes(tiny_sam) -> list[Example]:
    """20 human masks on 20 items, embedded once for the module."""
    out = []
    for seed in range(20):
        image, mask = shape_image(seed)
        out.append(Example(f"shape-{seed}", embed(tiny_sam, image, f"img{seed}"), mask))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the same figures on every machine (restored for the tests after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(checkpoint: Path):
    """A tiny SAM of its own (training changes weights; the session's tiny_sam stays untouched)."""
    return load_sam("tiny", checkpoint, "cpu")


def test_the_held_out_split_is_by_item_id_and_stable():
    ids = [f"item-{i}" for i in range(2000)]
    held = [i for i in ids if held_out(i, 0.2)]
    assert 0.17 < len(held) / len(ids) < 0.23
    assert held == [i for i in reversed(ids) if held_out(i, 0.2)][::-1]  # order never matters
    assert set(held) <= {i for i in ids if held_out(i, 0.5)}  # a larger share holds the smaller one


def test_fine_tuning_raises_held_out_miou_and_writes_an_official_checkpoint(shapes, tiny_checkpoint, tmp_path):
    loaded = fresh(tiny_checkpoint)
    config = TrainConfig(epochs=8, lr=2e-3, batch_size=1, holdout_fraction=0.3)
    card = train_decoder(loaded, tiny_checkpoint, shapes, config, tmp_path / "ft")

    # Measured: one click 0.10 -> 0.95, box 0.08 -> 0.95 on the 5 held-out masks. Bars well below.
    held = {e.item_id for e in shapes if held_out(e.item_id, 0.3)}
    assert card.held_out_masks == len(held) >= 3 and card.trained_masks == len(shapes) - len(held)
    before, after = card.before["one_click"]["miou"], card.after["one_click"]["miou"]
    assert before < 0.3 and after > 0.7 and after - before > 0.4, (before, after)
    assert card.after["box"]["miou"] - card.before["box"]["miou"] > 0.4
    assert card.after["three_clicks"]["boundary_iou"] > card.before["three_clicks"]["boundary_iou"] + 0.3
    assert [e["loss"] for e in card.epoch_losses][-1] < 0.5 * card.epoch_losses[0]["loss"]

    # The card says exactly what was trained on, and nothing held out was.
    assert set(card.held_out_items) == held and not held & set(card.trained_items)
    assert len(card.trained_items) + len(card.held_out_items) == 20
    assert card.base_sha256 == file_sha256(tiny_checkpoint) and card.encoder_id == loaded.encoder_id == loaded.decoder_id
    assert card.hyperparameters["lr"] == 2e-3 and card.hyperparameters["rounds"] == 2
    path = tmp_path / "ft" / card.checkpoint
    assert json.loads(card_path(path).read_text())["checkpoint_sha256"] == file_sha256(path)
    assert card.decoder_id == f"tiny-{file_sha256(path)[:12]}" != loaded.decoder_id

    # The checkpoint is a full SAM state dict: the loader builds it, the encoder is the base's
    # (the stored embeddings stay valid), the decoder is the trained one.
    again = load_sam("tiny", path)
    new, base = again.model.state_dict(), fresh(tiny_checkpoint).model.state_dict()
    assert new.keys() == base.keys()
    assert all(torch.equal(new[k], base[k]) for k in new if not k.startswith("mask_decoder."))
    assert not all(torch.equal(new[k], base[k]) for k in new if k.startswith("mask_decoder."))
    assert again.encoder_id == loaded.encoder_id  # the card carries the base's encoder id
    assert again.decoder_id == card.decoder_id
    assert list(tmp_path.joinpath("ft").glob(".*tmp*")) == []  # nothing half-written left


def test_a_stopped_run_resumes_to_exactly_the_same_weights(shapes, tiny_checkpoint, tmp_path):
    data = shapes[:8]
    config = TrainConfig(epochs=2, lr=1e-3, batch_size=2, rounds=1, holdout_fraction=0.3)
    straight = train_decoder(fresh(tiny_checkpoint), tiny_checkpoint, data, config, tmp_path / "a")

    # The same run stopped after its first epoch (a one-epoch run leaves the same state), then resumed.
    first = TrainConfig(**{**config.to_json(), "epochs": 1})
    train_decoder(fresh(tiny_checkpoint), tiny_checkpoint, data, first, tmp_path / "b")
    resumed = train_decoder(fresh(tiny_checkpoint), tiny_checkpoint, data, config, tmp_path / "b")
    assert [e["epoch"] for e in resumed.epoch_losses] == [0, 1]
    assert resumed.epoch_losses == straight.epoch_losses and resumed.after == straight.after
    a = torch.load(tmp_path / "a" / straight.checkpoint, weights_only=True)
    b = torch.load(tmp_path / "b" / resumed.checkpoint, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / STATE_FILE).is_file()

    # Another run's state in the folder is refused, not mixed in.
    with pytest.raises(FailedPrecondition, match="belongs to a run on other data"):
        train_decoder(fresh(tiny_checkpoint), tiny_checkpoint, shapes[:9], config, tmp_path / "b")


def test_too_few_masks_and_foreign_embeddings_are_refused_by_name(shapes, tiny_checkpoint, tmp_path):
    loaded = fresh(tiny_checkpoint)
    config = TrainConfig(holdout_fraction=0.3)
    with pytest.raises(FailedPrecondition, match="0 human-accepted masks on 0 items"):
        train_decoder(loaded, tiny_checkpoint, [], config, tmp_path / "none")
    only_train = [e for e in shapes if not held_out(e.item_id, 0.3)][:2]
    with pytest.raises(FailedPrecondition, match=r"2 human-accepted masks on 2 items: 2 would train and 0 be held out"):
        train_decoder(loaded, tiny_checkpoint, only_train, config, tmp_path / "few")
    foreign = [Example(e.item_id, e.embedding.__class__(**{**e.embedding.__dict__, "model_id": "vit_h-0123456789ab"}),
                       e.mask) for e in shapes[:3]]
    with pytest.raises(FailedPrecondition, match="3 masks have embeddings of encoder vit_h-0123456789ab"):
        train_decoder(loaded, tiny_checkpoint, shapes + foreign, config, tmp_path / "foreign")
    assert not (tmp_path / "foreign" / "sam_tiny_ft.pth").exists()
    assert read_card(tiny_checkpoint) is None


@pytest.mark.slow
def test_a_fine_tuned_vit_b_checkpoint_loads_through_segment_anythings_registry(tmp_path):
    """The official format: ``sam_model_registry["vit_b"](checkpoint=...)`` builds it, strict."""
    from segment_anything import sam_model_registry

    from services.common.embedding import StoredEmbedding
    from services.common.sam_models import save_random_checkpoint

    base = save_random_checkpoint("vit_b", tmp_path / "sam_vit_b.pth", seed=0)
    loaded = load_sam("vit_b", base)
    rng = np.random.default_rng(0)
    examples = []
    for i in range(6):
        features = rng.normal(0, 1, (1, 256, 64, 64)).astype(np.float16)
        emb = StoredEmbedding(features, loaded.encoder_id, f"img{i}", (48, 64), (768, 1024), (0, 0, 64, 48))
        mask = np.zeros((48, 64), bool)
        mask[10:30, 20:50] = True
        examples.append(Example(f"vitb-{i}", emb, mask))
    config = TrainConfig(epochs=1, rounds=0, batch_size=2, holdout_fraction=0.5)
    card = train_decoder(loaded, base, examples, config, tmp_path / "ft")
    path = tmp_path / "ft" / card.checkpoint
    official = sam_model_registry["vit_b"](checkpoint=str(path))
    mine = torch.load(path, weights_only=True)
    assert official.state_dict().keys() == mine.keys()
    assert all(torch.equal(official.state_dict()[k], mine[k]) for k in mine)
    assert card.trained_masks + card.held_out_masks == 6 and card.trained_masks > 0 < card.held_out_masks


def _run_dir(tmp_path: Path, shapes: list[Example]) -> Path:
    """A `dataengine run` folder whose items a human accepted (all but two: one auto-accepted, one
    the human discarded, neither to be trained on)."""
    from services.common.keys import manifest_key
    from services.common.masks import MaskRecord, encode_rle
    from services.common.storage import LocalStore
    from services.app.embedded import STORE_DIR
    from services.orchestrator.model import Item, ItemState, PhraseResult
    from tests.decoder.builders import put

    store = LocalStore(tmp_path / "run" / STORE_DIR)
    for i, e in enumerate(shapes):
        record = MaskRecord(encode_rle(e.mask), [0, 0, 1, 1], int(e.mask.sum()), 1.0, 1.0, source="human:ann")
        human = i != 0
        state = ItemState.DISCARDED if i == 1 else ItemState.ACCEPTED
        phrase = PhraseResult("shape", masks=[record], provenance="human:ann" if human else "sam3",
                              state=ItemState.ACCEPTED, grounded=True)
        item = Item(e.item_id, f"{e.item_id}.png", f"images/{i}", e.embedding.image_id, state=state,
                    reviewer="ann" if human else "", outputs={"embed": put(store, e.embedding)}, phrases=[phrase])
        store.put(manifest_key(e.item_id), json.dumps(item.to_json()).encode())
    return tmp_path / "run"


def test_train_decoder_and_eval_masks_on_a_run_folder(shapes, tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from services.app.cli import app

    run = _run_dir(tmp_path, shapes[:10])
    runner = CliRunner()
    model = ["--model-type", "tiny", "--device", "cpu"]
    trained = runner.invoke(app, ["train", "decoder", "--run", str(run), "--out", str(tmp_path / "ft"), *model,
                                  "--checkpoint", str(tiny_checkpoint), "--epochs", "1", "--rounds", "0",
                                  "--holdout", "0.3"])
    assert trained.exit_code == 0, trained.output
    card = json.loads(trained.stdout)
    held = sum(held_out(e.item_id, 0.3) for e in shapes[2:10])
    assert card["trained_masks"] + card["held_out_masks"] == 8 and card["held_out_masks"] == held  # 2 left out
    new = tmp_path / "ft" / card["checkpoint"]

    measured = runner.invoke(app, ["eval", "masks", "--run", str(run), *model, "--holdout", "0.3",  # as eval-masks
                                   "--checkpoint", str(tiny_checkpoint), "--checkpoint", str(new)])
    assert measured.exit_code == 0, measured.output
    figures = json.loads(measured.stdout)
    assert figures["items"] == held and set(figures["checkpoints"]) == {str(tiny_checkpoint), str(new)}
    assert figures["checkpoints"][str(new)] == card["after"]  # the card's figures are eval-masks' figures

    empty = runner.invoke(app, ["train", "decoder", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert empty.exit_code == 2 and "holds no engine store" in empty.output
