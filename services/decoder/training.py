"""``train decoder`` end to end: split, measure the base, fine-tune, measure again, write the
checkpoint and its model card.

The model card (JSON, beside the checkpoint with the same stem) says what the checkpoint is:
the base checkpoint and its SHA-256, the encoder id its embeddings carry (a fine-tuned decoder
keeps the base's encoder, so it keeps using the stored embeddings), the exact item ids trained on
and held out, mask counts, the hyperparameters, the loss per epoch, and mIoU / boundary IoU of one
click, three clicks and a box on the held-out masks before and after.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from services.common.errors import FailedPrecondition
from services.common.model_card import ModelCard, card_path
from services.common.sam_models import LoadedSam, file_sha256
from services.common.splits import held_out
from services.decoder.finetune import (Progress, TrainConfig, TrainState, fingerprint,
                                       load_state, make_optimizer, run_epoch, save_checkpoint, save_state)
from services.decoder.mask_eval import evaluate
from services.decoder.prompting import Example, prepare

MIN_TRAIN, MIN_HELD_OUT = 1, 1  # masks each split needs at least


def split(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, held out) by item id (``finetune.held_out``): all masks of an item on one side."""
    train = [e for e in examples if not held_out(e.item_id, fraction)]
    return train, [e for e in examples if held_out(e.item_id, fraction)]


def check_examples(examples: list[Example], train: list[Example], held: list[Example], encoder: str) -> None:
    other = sorted({e.embedding.model_id for e in examples} - {encoder})
    if other:
        raise FailedPrecondition(f"{sum(e.embedding.model_id != encoder for e in examples)} masks have embeddings of "
                                 f"encoder {', '.join(other)}, not this checkpoint's {encoder}: train from the "
                                 "checkpoint that embedded them")
    if len(train) < MIN_TRAIN or len(held) < MIN_HELD_OUT:
        raise FailedPrecondition(
            f"{len(examples)} human-accepted masks on {len({e.item_id for e in examples})} items: "
            f"{len(train)} would train and {len(held)} be held out; training needs at least {MIN_TRAIN} "
            f"and {MIN_HELD_OUT} (review more items in the studio, or change --holdout)")


def train_decoder(loaded: LoadedSam, base: Path, examples: list[Example], config: TrainConfig, out_dir: Path,
                  progress: Progress | None = None) -> ModelCard:
    """Fine-tune ``loaded``'s decoder on ``examples``' train split; write ``out_dir/sam_<type>_ft.pth``
    and its card. Resumes from ``out_dir/train_state.pt`` when a run on the same data stopped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = loaded.encoder_id  # a fine-tuned base keeps its own base's encoder (its card says)
    train, held = split(examples, config.holdout_fraction)
    check_examples(examples, train, held, encoder)
    sam, device = loaded.model, loaded.device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    train_targets = [prepare(sam, e, device) for e in train]
    held_targets = [prepare(sam, e, device) for e in held]
    base_sha = file_sha256(base)
    train_ids = sorted({e.item_id for e in train})
    optimizer = make_optimizer(sam, config)
    expected = fingerprint(config, base_sha, train_ids)
    state = load_state(out_dir, sam, optimizer, rng, config, expected)
    if state is None:
        state = TrainState(0, [], evaluate(sam, held_targets).to_json(), expected)
    for epoch in range(state.next_epoch, config.epochs):
        state.epoch_losses.append(run_epoch(sam, train_targets, optimizer, rng, config, epoch, progress))
        state.next_epoch = epoch + 1
        save_state(out_dir, sam, optimizer, rng, state, config)
    for p in sam.parameters():
        p.requires_grad_(False)
    after = evaluate(sam, held_targets).to_json()
    checkpoint = out_dir / f"sam_{loaded.model_type}_ft.pth"
    save_checkpoint(sam, checkpoint)
    sha = file_sha256(checkpoint)
    card = ModelCard(
        model_type=loaded.model_type, checkpoint=checkpoint.name, checkpoint_sha256=sha,
        decoder_id=f"{loaded.model_type}-{sha[:12]}", encoder_id=encoder, base_checkpoint=str(base),
        base_sha256=base_sha, trained_items=train_ids, held_out_items=sorted({e.item_id for e in held}),
        trained_masks=len(train), held_out_masks=len(held), hyperparameters=config.to_json(),
        epoch_losses=state.epoch_losses, before=state.before, after=after, device=str(device))
    card.write(card_path(checkpoint))
    return card  # train_state.pt stays: the same command with more --epochs goes on from here
