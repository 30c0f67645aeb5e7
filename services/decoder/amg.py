"""Automatic mask generation: segment-anything's SamAutomaticMaskGenerator, from stored embeddings.

The same masks, scores and order as the official generator with ``output_mode="coco_rle"``,
computed with less work:

- the predicted-IoU filter runs before anything is upscaled (it needs only the IoU token), and
  only prompts with a mask that passes it go through the decoder's upscaling half;
- only the masks that pass it are upsampled to full resolution (the official code upsamples all
  points_per_batch x 3 candidates first), in small chunks that stay in cache;
- stability scores and binary masks come from those full-resolution logits with the official
  thresholds; boxes are found from row/column occupancy (the same integers as
  ``batched_mask_to_box``); RLEs are encoded by pycocotools straight from the mask, with no
  uncompressed RLE in between.

Every filter, NMS call and tie-break is the official one, on the same values, in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.modeling import Sam
from segment_anything.utils.amg import (MaskData, batch_iterator, box_xyxy_to_xywh,
                                        build_all_layer_point_grids, generate_crop_boxes,
                                        is_box_near_crop_edge, remove_small_regions,
                                        uncrop_boxes_xyxy, uncrop_points)
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.ops.boxes import batched_nms, box_area

from services.common.embedding import StoredEmbedding
from services.common.errors import FailedPrecondition
from services.common.masks import MaskRecord
from services.common.amg_params import AmgParams
from services.decoder.prompt_decoder import PromptDecoder

Box = tuple[int, int, int, int]
# Full-resolution logits held at once (floats): bounds memory, keeps a chunk near the cache.
_FULL_RES_BUDGET = 16 * 1024 * 1024


@dataclass(frozen=True)
class CropEmbedding:
    """An embedding already on the model's device.

    features: 1xCx64x64 float32. input_size: (h, w) of the crop after ResizeLongestSide.
    """

    features: torch.Tensor
    input_size: tuple[int, int]


Embedding = StoredEmbedding | CropEmbedding


def crop_boxes(orig_size: tuple[int, int], params: AmgParams) -> list[Box]:
    """XYXY pixel boxes of the crops generation reads, the full image first.

    orig_size: (H, W) of the image. Each box needs its own embedding.
    """
    boxes, _ = generate_crop_boxes(tuple(orig_size), params.crop_n_layers, params.crop_overlap_ratio)
    return [tuple(int(v) for v in box) for box in boxes]


def generate(sam: Sam, embeddings: Mapping[Box, Embedding], orig_size: tuple[int, int],
             params: AmgParams, timings: dict[str, float] | None = None) -> list[MaskRecord]:
    """SA-1B records of the automatic masks of one image, as SamAutomaticMaskGenerator's.

    embeddings: the embedding of every box in ``crop_boxes(orig_size, params)``, keyed by box
        (features fp16 or fp32; they are used as float32 on the model's device).
    orig_size: (H, W) pixels of the full image.
    timings: if given, seconds spent are added under "decoder" and "postprocess".
    """
    timings = timings if timings is not None else {}
    orig_size = (int(orig_size[0]), int(orig_size[1]))
    boxes, layer_idxs = generate_crop_boxes(orig_size, params.crop_n_layers, params.crop_overlap_ratio)
    grids = build_all_layer_point_grids(params.points_per_side, params.crop_n_layers,
                                        params.crop_n_points_downscale_factor)
    data = MaskData()
    for box, layer_idx in zip(boxes, layer_idxs):
        box = tuple(int(v) for v in box)
        features, input_size = _features(sam, embeddings, box)
        data.cat(_process_crop(sam, features, input_size, box, grids[layer_idx], orig_size, params,
                               timings))
    start = time.perf_counter()
    if len(boxes) > 1:
        # Remove duplicates between crops, preferring masks from smaller crops (official order).
        scores = 1 / box_area(data["crop_boxes"])
        keep = batched_nms(data["boxes"].float(), scores, torch.zeros(len(data["boxes"])),
                           iou_threshold=params.crop_nms_thresh)
        data.filter(keep)
    data.to_numpy()
    if params.min_mask_region_area > 0:
        _remove_small_regions(data, params.min_mask_region_area,
                              max(params.box_nms_thresh, params.crop_nms_thresh))
    records = _records(data)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - start
    return records


def _features(sam: Sam, embeddings: Mapping[Box, Embedding], box: Box) -> tuple[torch.Tensor, tuple[int, int]]:
    emb = embeddings.get(box)
    if emb is None:
        raise FailedPrecondition(f"no embedding for crop box {list(box)}; embed every box of "
                                 "crop_boxes() with the same crop_n_layers and crop_overlap_ratio")
    device = sam.device
    if isinstance(emb, StoredEmbedding):
        crop_size = (box[3] - box[1], box[2] - box[0])
        if tuple(emb.original_size) != crop_size:
            raise FailedPrecondition(f"the embedding for crop box {list(box)} is of a {emb.original_size} "
                                     f"image, expected {crop_size}")
        features = torch.from_numpy(np.ascontiguousarray(emb.features)).to(device=device, dtype=torch.float32)
    else:
        features = emb.features.to(device=device, dtype=torch.float32)
    expected = (1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    if tuple(features.shape) != expected:
        raise FailedPrecondition(f"the embedding for crop box {list(box)} has shape {tuple(features.shape)}, "
                                 f"this model decodes {expected}: was it made by another model?")
    return features, tuple(int(v) for v in emb.input_size)


def _process_crop(sam: Sam, features: torch.Tensor, input_size: tuple[int, int], box: Box,
                  grid: np.ndarray, orig_size: tuple[int, int], params: AmgParams,
                  timings: dict[str, float]) -> MaskData:
    """The masks of one crop, in the full image's frame (official _process_crop)."""
    crop_size = (box[3] - box[1], box[2] - box[0])
    decoder = PromptDecoder(sam, features)
    points_for_image = grid * np.array(crop_size)[None, ::-1]  # XY pixels in the crop
    data = MaskData()
    for (points,) in batch_iterator(params.points_per_batch, points_for_image):
        data.cat(_process_batch(sam, decoder, points, input_size, crop_size, box, orig_size, params,
                                timings))
    start = time.perf_counter()
    keep = batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(len(data["boxes"])),
                       iou_threshold=params.box_nms_thresh)
    data.filter(keep)
    data["boxes"] = uncrop_boxes_xyxy(data["boxes"], list(box))
    data["points"] = uncrop_points(data["points"], list(box))
    data["crop_boxes"] = torch.tensor([list(box)], dtype=torch.int64).repeat(len(data["rles"]), 1)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - start
    return data


def _process_batch(sam: Sam, decoder: PromptDecoder, points: np.ndarray, input_size: tuple[int, int],
                   crop_size: tuple[int, int], box: Box, orig_size: tuple[int, int], params: AmgParams,
                   timings: dict[str, float]) -> MaskData:
    """One batch of grid prompts: decode, filter, encode. points: Nx2 float64 XY crop pixels."""
    start = time.perf_counter()
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    # float64 as in the official generator: the prompt encoder normalises before casting.
    in_points = torch.as_tensor(transform.apply_coords(points, crop_size), device=sam.device)
    in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=sam.device)
    decoded = decoder.transform(in_points[:, None, :], in_labels[:, None])
    iou_preds = decoder.iou(decoded, multimask_output=True)
    n_masks = iou_preds.shape[1]
    iou_preds = iou_preds.flatten(0, 1)
    keep = iou_preds > params.pred_iou_thresh if params.pred_iou_thresh > 0.0 else \
        torch.ones_like(iou_preds, dtype=torch.bool)
    flat = torch.nonzero(keep).flatten()  # prompt-major, as the official flatten(0, 1)
    rows, slot = flat // n_masks, flat % n_masks
    prompt_rows = torch.unique(rows)
    low_res = decoder.masks(decoded, True, prompt_rows) if len(prompt_rows) else None
    timings["decoder"] = timings.get("decoder", 0.0) + time.perf_counter() - start

    start = time.perf_counter()
    data = MaskData(iou_preds=iou_preds[flat].cpu(),
                    points=torch.as_tensor(points.repeat(n_masks, axis=0))[flat.cpu()])
    stability = torch.zeros(len(flat), dtype=torch.float32)
    boxes = torch.zeros(len(flat), 4, dtype=torch.int64)
    rles: list[dict | None] = [None] * len(flat)
    if low_res is not None:
        low_res = low_res[torch.searchsorted(prompt_rows, rows), slot]  # Kx256x256
        chunk = max(1, _FULL_RES_BUDGET // (crop_size[0] * crop_size[1] + sam.image_encoder.img_size ** 2))
        for i in range(0, len(flat), chunk):
            logits = sam.postprocess_masks(low_res[i:i + chunk, None], input_size, crop_size)[:, 0]
            stability[i:i + chunk] = _stability(logits, sam.mask_threshold, params.stability_score_offset)
            passing = (stability[i:i + chunk] >= params.stability_score_thresh
                       if params.stability_score_thresh > 0.0 else torch.ones(len(logits), dtype=torch.bool))
            binary = (logits[passing.to(logits.device)] > sam.mask_threshold).cpu()
            where = (torch.nonzero(passing).flatten() + i).tolist()
            boxes[where] = _mask_boxes(binary)
            for j, rle in zip(where, _encode(binary, box, orig_size)):
                rles[j] = rle
    data["stability_score"] = stability
    data["boxes"] = boxes
    data["rles"] = rles
    if params.stability_score_thresh > 0.0:
        data.filter(data["stability_score"] >= params.stability_score_thresh)
    # Masks touching the crop's edge (but not the image's) are cut off by the crop: drop them.
    near_edge = is_box_near_crop_edge(data["boxes"], list(box), [0, 0, orig_size[1], orig_size[0]])
    if torch.any(near_edge):
        data.filter(~near_edge)
    timings["postprocess"] = timings.get("postprocess", 0.0) + time.perf_counter() - start
    return data


def _stability(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """segment_anything's calculate_stability_score: the same integer counts, the same int32
    division (int64 sums, so no int16 partial sums that overflow on images wider than 32767)."""
    inter = (logits > (threshold + offset)).sum(dim=(-1, -2), dtype=torch.int64).to(torch.int32)
    union = (logits > (threshold - offset)).sum(dim=(-1, -2), dtype=torch.int64).to(torch.int32)
    return (inter / union).cpu()


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """XYXY int64 boxes (inclusive max) of KxHxW bool masks; [0, 0, 0, 0] for an empty mask.

    The integers of segment_anything's batched_mask_to_box, from row and column occupancy.
    """
    out = torch.zeros(len(masks), 4, dtype=torch.int64)
    if len(masks) == 0:
        return out
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)  # KxH, KxW
    h, w = masks.shape[-2:]
    for k in range(len(masks)):
        ys, xs = torch.nonzero(rows[k]).flatten(), torch.nonzero(cols[k]).flatten()
        if len(ys) and len(xs):
            out[k] = torch.stack([xs[0], ys[0], xs[-1], ys[-1]])
    return out


def _encode(masks: torch.Tensor, box: Box, orig_size: tuple[int, int]) -> list[dict]:
    """COCO compressed RLEs of KxhxW bool crop masks placed in the full HxW image."""
    if len(masks) == 0:
        return []
    h, w = orig_size
    x0, y0, x1, y1 = box
    # pycocotools wants HxWxK in Fortran order, which is KxWxH in C order.
    transposed = masks.transpose(1, 2).numpy().astype(np.uint8)
    if (x0, y0, x1, y1) == (0, 0, w, h):
        full = np.ascontiguousarray(transposed)
    else:
        full = np.zeros((len(masks), w, h), dtype=np.uint8)
        full[:, x0:x1, y0:y1] = transposed
    return mask_utils.encode(full.transpose(2, 1, 0))


def _remove_small_regions(data: MaskData, min_area: int, nms_thresh: float) -> None:
    """The official postprocess_small_regions on compressed RLEs (edits ``data`` in place)."""
    if len(data["rles"]) == 0:
        return
    changed_masks: dict[int, np.ndarray] = {}
    boxes, scores = [], []
    for i, rle in enumerate(data["rles"]):
        mask = mask_utils.decode(rle).astype(bool)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        boxes.append(_mask_boxes(torch.from_numpy(np.ascontiguousarray(mask))[None])[0])
        # Score 1 for unchanged masks, 0 for changed ones: NMS prefers masks that needed no fixing.
        scores.append(float(unchanged))
        if not unchanged:
            changed_masks[i] = mask
    new_boxes = torch.stack(boxes)
    keep = batched_nms(new_boxes.float(), torch.as_tensor(scores), torch.zeros(len(new_boxes)),
                       iou_threshold=nms_thresh)
    for i in keep.tolist():
        if i in changed_masks:
            data["rles"][i] = mask_utils.encode(np.asfortranarray(changed_masks[i].astype(np.uint8)))
            data["boxes"][i] = new_boxes[i].numpy()
    data.filter(keep)


def _records(data: MaskData) -> list[MaskRecord]:
    records = []
    for i, rle in enumerate(data["rles"]):
        records.append(MaskRecord(
            segmentation={"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
            bbox=[float(v) for v in box_xyxy_to_xywh(data["boxes"][i]).tolist()],
            area=int(mask_utils.area(rle)),
            predicted_iou=float(data["iou_preds"][i].item()),
            stability_score=float(data["stability_score"][i].item()),
            point_coords=[[float(v) for v in data["points"][i].tolist()]],
            crop_box=[float(v) for v in box_xyxy_to_xywh(data["crop_boxes"][i]).tolist()],
        ))
    return records
