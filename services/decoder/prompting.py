"""SAM's decoder on one stored embedding and a ground-truth mask, as training and evaluation need it.

``Target`` holds what one human mask is to the decoder: the embedding's features (1xCx64x64), the
mask at the original size (HxW bool) and in the decoder's own low-res frame (256x256: the image
resized to its longest side 1024, padded, at a quarter). ``decode`` runs the official prompt
encoder and mask decoder with gradients, so the same call trains and evaluates.

Prompts as in SAM's training (paper section 3 and appendix A): a point drawn uniformly from the
mask or its box jittered by up to 10% of its side (at most 20 px), then correction points drawn
from the error region (a missed pixel: positive; a wrong one: negative) with the previous low-res
logits fed back as the mask prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from services.common.embedding import StoredEmbedding

LOW_RES = 256


@dataclass(frozen=True)
class Example:
    """One human-accepted mask: ``mask`` HxW bool at the embedding's original size."""

    item_id: str
    embedding: StoredEmbedding
    mask: np.ndarray


@dataclass
class Target:
    """An ``Example`` ready for the decoder: features 1xCx64x64 float16 as stored (half the
    memory of a store's worth of embeddings; cast per decode), gt_low 1x1x256x256 (0/1),
    valid 256x256 bool (inside the resized image, not its padding)."""

    item_id: str
    features: torch.Tensor
    mask: np.ndarray
    gt_low: torch.Tensor
    valid: np.ndarray
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def prepare(sam: Sam, example: Example, device: torch.device) -> Target:
    emb = example.embedding
    h, w = emb.original_size
    if example.mask.shape != (h, w):
        raise ValueError(f"item {example.item_id}: mask {example.mask.shape} is not the embedding's size {(h, w)}")
    size = sam.image_encoder.img_size
    in_h, in_w = emb.input_size
    frame = np.zeros((size, size), np.float32)
    frame[:in_h, :in_w] = cv2.resize(example.mask.astype(np.float32), (in_w, in_h), interpolation=cv2.INTER_LINEAR)
    low = cv2.resize(frame, (LOW_RES, LOW_RES), interpolation=cv2.INTER_AREA) >= 0.5
    valid = np.zeros((LOW_RES, LOW_RES), bool)
    scale = size // LOW_RES
    valid[:-(-in_h // scale), :-(-in_w // scale)] = True
    return Target(example.item_id, torch.as_tensor(emb.features, dtype=torch.float16, device=device),
                  example.mask, torch.as_tensor(low, dtype=torch.float32, device=device)[None, None], valid,
                  (h, w), (in_h, in_w))


@dataclass
class Prompt:
    """Points (N x 2, XY pixels of the original image) with labels (1 in, 0 out), an XYXY box,
    the low-res logits of the round before (1x1x256x256) or None."""

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    mask_input: torch.Tensor | None = None

    def plus(self, point: tuple[float, float], label: int, mask_input: torch.Tensor) -> "Prompt":
        return Prompt(np.concatenate([self.points, [point]]).astype(np.float32),
                      np.concatenate([self.labels, [label]]).astype(np.int64), self.box, mask_input)


def mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def random_first_prompt(rng: np.random.Generator, mask: np.ndarray, box_probability: float) -> Prompt:
    if rng.random() < box_probability:
        box = mask_box(mask)
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
        noise = rng.normal(0.0, 0.1, 4).astype(np.float32) * side
        box = box + np.clip(noise, -20.0, 20.0)
        h, w = mask.shape
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
        return Prompt(np.zeros((0, 2), np.float32), np.zeros(0, np.int64), box)
    ys, xs = np.nonzero(mask)
    i = rng.integers(len(ys))
    return Prompt(np.array([[xs[i] + 0.5, ys[i] + 0.5]], np.float32), np.ones(1, np.int64))


def random_correction(rng: np.random.Generator, target: Target, logits: torch.Tensor, prompt: Prompt) -> Prompt:
    """A point drawn uniformly from where the low-res prediction is wrong, as a pixel of the original
    image; the prompt unchanged but for the mask input when nothing is wrong."""
    pred = (logits.detach()[0, 0] > 0).cpu().numpy()
    gt = target.gt_low[0, 0].cpu().numpy() > 0.5
    wrong = (pred != gt) & target.valid
    mask_input = logits.detach()
    if not wrong.any():
        return Prompt(prompt.points, prompt.labels, prompt.box, mask_input)
    rows, cols = np.nonzero(wrong)
    i = rng.integers(len(rows))
    r, c = rows[i], cols[i]
    scale = target.original_size[0] / target.input_size[0]  # original pixels per encoder-frame pixel
    step = 1024 / LOW_RES
    x = min((c + 0.5) * step * scale, target.original_size[1] - 1)
    y = min((r + 0.5) * step * scale, target.original_size[0] - 1)
    return prompt.plus((x, y), int(gt[r, c]), mask_input)


def decode(sam: Sam, target: Target, prompt: Prompt, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res logits 1xKx256x256, predicted IoU 1xK); K = 3 with ``multimask``, else 1."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    device = target.features.device
    points = None
    if len(prompt.points):
        coords = transform.apply_coords(prompt.points.astype(np.float64), target.original_size)
        points = (torch.as_tensor(coords[None], dtype=torch.float32, device=device),
                  torch.as_tensor(prompt.labels[None], dtype=torch.int, device=device))
    boxes = None
    if prompt.box is not None:
        boxes = torch.as_tensor(transform.apply_boxes(prompt.box[None].astype(np.float64), target.original_size),
                                dtype=torch.float32, device=device)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=prompt.mask_input)
    return sam.mask_decoder(image_embeddings=target.features.float(), image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=multimask)


def full_size(sam: Sam, target: Target, logits: torch.Tensor) -> np.ndarray:
    """Low-res logits 1xKx256x256 -> K x H x W bool masks at the original size (Sam.postprocess_masks)."""
    with torch.no_grad():
        up = sam.postprocess_masks(logits, target.input_size, target.original_size)
    return (up[0] > sam.mask_threshold).cpu().numpy()


def focal_dice_losses(logits: torch.Tensor, gt: torch.Tensor, alpha: float = 0.25,
                      gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output (K,): the focal loss (mean over pixels) and the dice loss of 1xKx256x256 logits
    against a 1x1x256x256 0/1 target."""
    gt = gt.expand_as(logits)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    p_t = p * gt + (1 - p) * (1 - gt)
    focal = (ce * (1 - p_t) ** gamma * (alpha * gt + (1 - alpha) * (1 - gt))).mean(dim=(2, 3))[0]
    inter = (p * gt).sum(dim=(2, 3))
    dice = (1 - (2 * inter + 1) / (p.sum(dim=(2, 3)) + gt.sum(dim=(2, 3)) + 1))[0]
    return focal, dice


def low_res_iou(logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU (K,) of each thresholded low-res output against the target: what the IoU head should say."""
    pred = (logits.detach() > 0).float()
    gt = gt.expand_as(pred)
    inter = (pred * gt).sum(dim=(2, 3))
    union = ((pred + gt) > 0).float().sum(dim=(2, 3))
    return (inter / union.clamp(min=1))[0]
