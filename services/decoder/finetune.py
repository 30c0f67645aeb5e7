"""Fine-tuning SAM's mask decoder on human masks, from stored embeddings (no encoder pass).

One step per human mask, as SAM's training does it (paper, appendix A "Training algorithm"):
round 0 samples a point inside the mask or a jittered box and asks for three masks; the loss
(focal x 20 + dice, the paper's 20:1) counts only the output that matches best, as SAM's
multimask training does. Each of ``rounds`` correction rounds then adds a point from the error
region, feeds the previous low-res logits back as the mask prompt and asks for one mask. The IoU
head learns the true IoU of every output by MSE. The loss of a mask is the mean over its rounds;
AdamW steps once per ``batch_size`` masks.

The image encoder never runs (its features are the stored ones) and stays frozen; the prompt
encoder is trained only with ``train_prompt_encoder``.

Resumable: after every epoch ``train_state.pt`` (the trained modules, the optimizer, the random
generators, the epoch's losses) replaces the previous one atomically, so a killed run resumes at
its next epoch, on the same data and settings (else refused). The checkpoint is written once, at
the end, through a temporary file and ``os.replace``: there is never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from segment_anything.modeling import Sam

from services.common.errors import FailedPrecondition
from services.decoder.prompting import (Target, decode, focal_dice_losses, low_res_iou,
                                        random_correction, random_first_prompt)

STATE_FILE = "train_state.pt"
FOCAL_WEIGHT = 20.0  # SAM paper: focal and dice losses 20:1


@dataclass(frozen=True)
class TrainConfig:
    """lr: AdamW learning rate; weight_decay: AdamW's. rounds: correction rounds after the first
    prompt. box_probability: how often the first prompt is a box rather than a point.
    holdout_fraction: share of items (by item id) never trained on. batch_size: masks per step."""

    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.01
    rounds: int = 2
    box_probability: float = 0.5
    batch_size: int = 4
    holdout_fraction: float = 0.2
    train_prompt_encoder: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.rounds < 0:
            raise ValueError("epochs and batch_size must be at least 1, rounds at least 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_json(self) -> dict:
        return asdict(self)


def trained_modules(sam: Sam, config: TrainConfig) -> dict[str, torch.nn.Module]:
    modules = {"mask_decoder": sam.mask_decoder}
    if config.train_prompt_encoder:
        modules["prompt_encoder"] = sam.prompt_encoder
    return modules


@dataclass
class StepLoss:
    """Mean per mask of one step's parts: focal (x20 included), dice, IoU-head MSE."""

    focal: float
    dice: float
    iou: float

    @property
    def total(self) -> float:
        return self.focal + self.dice + self.iou


def mask_loss(sam: Sam, target: Target, rng: np.random.Generator, config: TrainConfig) -> tuple[torch.Tensor, StepLoss]:
    """The loss of one human mask over its prompt rounds (a scalar with gradients)."""
    prompt = random_first_prompt(rng, target.mask, config.box_probability)
    totals = torch.zeros(3)
    loss = torch.zeros((), device=target.features.device)
    for round_ in range(config.rounds + 1):
        logits, iou_pred = decode(sam, target, prompt, multimask=round_ == 0)
        focal, dice = focal_dice_losses(logits, target.gt_low)
        mask_losses = FOCAL_WEIGHT * focal + dice
        best = int(torch.argmin(mask_losses.detach()))
        iou_mse = torch.mean((iou_pred[0] - low_res_iou(logits, target.gt_low)) ** 2)
        loss = loss + mask_losses[best] + iou_mse
        totals += torch.stack([FOCAL_WEIGHT * focal[best], dice[best], iou_mse]).detach().cpu()
        if round_ < config.rounds:
            prompt = random_correction(rng, target, logits[:, best:best + 1], prompt)
    n = config.rounds + 1
    return loss / n, StepLoss(*(float(v) / n for v in totals))


@dataclass
class TrainState:
    """What a resumed run needs: the next epoch, each finished epoch's mean loss, the held-out
    figures of the base model (measured once), the identity of the data and settings."""

    next_epoch: int
    epoch_losses: list[dict]
    before: dict
    fingerprint: str


def fingerprint(config: TrainConfig, base_sha256: str, train_ids: list[str]) -> str:
    """Same data, same base, same settings (the epoch count aside: a run may be extended)."""
    settings = {k: v for k, v in config.to_json().items() if k != "epochs"}
    text = repr((sorted(settings.items()), base_sha256, sorted(train_ids)))
    return hashlib.sha256(text.encode()).hexdigest()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(out_dir: Path, sam: Sam, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
               state: TrainState, config: TrainConfig) -> None:
    _atomic_save({"modules": {n: m.state_dict() for n, m in trained_modules(sam, config).items()},
                  "optimizer": optimizer.state_dict(), "numpy_rng": rng.bit_generator.state,
                  "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), **asdict(state)},
                 out_dir / STATE_FILE)


def load_state(out_dir: Path, sam: Sam, optimizer: torch.optim.Optimizer, rng: np.random.Generator,
               config: TrainConfig, expected: str) -> TrainState | None:
    """Restore a previous run's state from ``out_dir`` into ``sam``, ``optimizer`` and ``rng``;
    None when there is none. Refused when it was another run's (data, base or settings)."""
    path = out_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        state = TrainState(saved["next_epoch"], saved["epoch_losses"], saved["before"], saved["fingerprint"])
    except Exception as exc:
        raise FailedPrecondition(f"{path} is not a readable training state ({exc}); delete it to start over") from None
    if state.fingerprint != expected:
        raise FailedPrecondition(f"{path} belongs to a run on other data, another base checkpoint or other "
                                 "settings; give another --out or delete it to start over")
    device = next(sam.parameters()).device
    for name, module in trained_modules(sam, config).items():
        module.load_state_dict({k: v.to(device) for k, v in saved["modules"][name].items()})
    optimizer.load_state_dict(saved["optimizer"])
    rng.bit_generator.state = saved["numpy_rng"]
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    return state


def make_optimizer(sam: Sam, config: TrainConfig) -> torch.optim.Optimizer:
    for p in sam.parameters():
        p.requires_grad_(False)
    params = [p for m in trained_modules(sam, config).values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


Progress = Callable[[int, int, int, float], None]  # (epoch, masks done in it, of how many, mean loss so far)


def run_epoch(sam: Sam, targets: list[Target], optimizer: torch.optim.Optimizer, rng: np.random.Generator,
              config: TrainConfig, epoch: int, progress: Progress | None = None) -> dict:
    """One pass over ``targets`` in a random order; the epoch's mean losses."""
    sam.train()
    order = rng.permutation(len(targets))
    sums = StepLoss(0.0, 0.0, 0.0)
    optimizer.zero_grad(set_to_none=True)
    for done, index in enumerate(order, 1):
        loss, parts = mask_loss(sam, targets[index], rng, config)
        (loss / config.batch_size).backward()
        sums = StepLoss(sums.focal + parts.focal, sums.dice + parts.dice, sums.iou + parts.iou)
        if done % config.batch_size == 0 or done == len(order):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(epoch, done, len(order), sums.total / done)
    sam.eval()
    n = max(1, len(order))
    return {"epoch": epoch, "loss": sums.total / n, "focal": sums.focal / n, "dice": sums.dice / n,
            "iou_mse": sums.iou / n}


def save_checkpoint(sam: Sam, path: Path) -> None:
    """The full SAM state dict (the official format: segment-anything's registry loads it),
    written to a temporary file beside ``path`` and moved into place."""
    _atomic_save({k: v.detach().cpu() for k, v in sam.state_dict().items()}, path)
