"""How well a decoder segments the human masks: mIoU and boundary IoU for one click, three clicks
and a box, with deterministic prompts (the interactive-segmentation protocol of RITM and SAM).

A click goes where the error is deepest: the first at the mask's pixel farthest from its border,
each next at the pixel farthest from the border of the larger error region (a missed region: a
positive click; a wrong one: negative), with the previous low-res logits fed back. One click lets
the decoder give three masks and keeps the one its IoU head scores highest, as the studio shows
it; later clicks and the box ask for one. Masks compared at the image's original size.

Boundary IoU (Cheng et al., CVPR 2021): IoU of the masks' pixels within ``d`` of their contours,
``d`` 2% of the image diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from segment_anything.modeling import Sam

from services.decoder.prompting import Prompt, Target, decode, full_size, mask_box

MODES = ("one_click", "three_clicks", "box")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """The mask's pixels within ``d`` pixels of its contour (image borders count as outside)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    h, w = gt.shape
    d = max(1, int(round(dilation_ratio * np.hypot(h, w))))
    return iou(boundary(gt, d), boundary(pred, d))


def deepest(region: np.ndarray) -> tuple[tuple[float, float], float]:
    """The pixel of ``region`` farthest from its border, as (x, y) pixel centre, and that distance."""
    dist = cv2.distanceTransform(np.pad(region.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return (x + 0.5, y + 0.5), float(dist[y, x])


def next_click(gt: np.ndarray, pred: np.ndarray) -> tuple[tuple[float, float], int] | None:
    missed, wrong = gt & ~pred, pred & ~gt
    (p_in, d_in), (p_out, d_out) = deepest(missed), deepest(wrong)
    if max(d_in, d_out) == 0:
        return None  # nothing left to fix
    return (p_in, 1) if d_in >= d_out else (p_out, 0)


@dataclass(frozen=True)
class Scores:
    """Per mode: mean IoU and mean boundary IoU over the masks."""

    count: int
    miou: dict[str, float]
    boundary_iou: dict[str, float]

    def to_json(self) -> dict:
        return {"masks": self.count, **{m: {"miou": round(self.miou[m], 4),
                                            "boundary_iou": round(self.boundary_iou[m], 4)} for m in self.miou}}


def _best(logits: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    i = int(torch.argmax(iou_pred[0]))
    return logits[:, i:i + 1]


def predict_mode(sam: Sam, target: Target, mode: str) -> np.ndarray:
    """The HxW mask the decoder gives ``target`` under ``mode``'s prompts."""
    gt = target.mask
    if mode == "box":
        logits, _ = decode(sam, target, Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), mask_box(gt)),
                           multimask=False)
        return full_size(sam, target, logits)[0]
    (x, y), _ = deepest(gt)
    prompt = Prompt(np.array([[x, y]], np.float32), np.ones(1, np.int64))
    logits, iou_pred = decode(sam, target, prompt, multimask=True)
    logits = _best(logits, iou_pred)
    pred = full_size(sam, target, logits)[0]
    for _ in range(2 if mode == "three_clicks" else 0):
        click = next_click(gt, pred)
        if click is None:
            break
        prompt = prompt.plus(click[0], click[1], logits)
        logits, _ = decode(sam, target, prompt, multimask=False)
        pred = full_size(sam, target, logits)[0]
    return pred


def evaluate(sam: Sam, targets: list[Target], modes: tuple[str, ...] = MODES) -> Scores:
    """mIoU and boundary IoU of ``sam``'s decoder on ``targets`` per mode (no gradients)."""
    ious: dict[str, list[float]] = {m: [] for m in modes}
    bious: dict[str, list[float]] = {m: [] for m in modes}
    was_training = sam.training
    sam.eval()
    with torch.no_grad():
        for target in targets:
            for mode in modes:
                pred = predict_mode(sam, target, mode)
                ious[mode].append(iou(target.mask, pred))
                bious[mode].append(boundary_iou(target.mask, pred))
    sam.train(was_training)
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return Scores(len(targets), {m: mean(v) for m, v in ious.items()}, {m: mean(v) for m, v in bious.items()})
