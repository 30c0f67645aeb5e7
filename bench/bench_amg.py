"""Automatic mask generation, ours against segment-anything's SamAutomaticMaskGenerator, side by side.

Both start from the same precomputed embedding of a synthetic picture (a vit_b with random weights:
no checkpoint can be downloaded here), fp16-rounded as our store keeps it; the official generator
reads it through its predictor (set_image patched to load it), so both decode the same numbers.

Random weights make the predicted IoU small and the logits flat, so the official thresholds keep
nothing. Two settings are timed:
  official: the official defaults (nothing survives the IoU filter; the official code still
            upsamples every candidate to full resolution, ours upsamples none);
  realistic: pred_iou_thresh and stability_score_thresh set to quantiles of the candidates' own
            scores (from a probe of 64 prompts), so that about --iou-keep of the candidate masks pass
            the IoU filter and about --stability-keep of those pass the stability filter, as with a
            trained SAM on a natural image; the stability offset is scaled to the logits' spread.

Usage: .venv/bin/python -m bench.bench_amg [--size 1500x2250] [--points-per-side 32] [--json PATH]
The last line of stdout is the JSON of the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

from services.common.embedding import StoredEmbedding
from services.decoder import amg
from services.common.amg_params import AmgParams
from services.decoder.prompt_decoder import PromptDecoder


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """HxWx3 uint8: smooth gradients, discs and rectangles of flat colour with mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.stack([120 + 60 * np.sin(xx / w * 3 + c) * np.cos(yy / h * 2 - c) for c in range(3)], -1)
    for _ in range(25):
        color = rng.uniform(0, 255, 3)
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.03, 0.2) * min(h, w)
        if rng.random() < 0.5:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = color
        else:
            image[int(max(cy - r, 0)):int(cy + r), int(max(cx - r, 0)):int(cx + r)] = color
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def official_generate(sam, emb: StoredEmbedding, image: np.ndarray, params: AmgParams) -> list[dict]:
    generator = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **params.to_kwargs())

    def set_image(_image, image_format="RGB"):
        predictor = generator.predictor
        predictor.features = torch.from_numpy(emb.features).float()
        predictor.original_size, predictor.input_size = emb.original_size, emb.input_size
        predictor.is_image_set = True

    generator.predictor.set_image = set_image
    return generator.generate(image)


def compare(official: list[dict], ours: list) -> dict:
    """Count, and for each of our masks its best official match: IoU and score differences."""
    out = {"official_count": len(official), "ours_count": len(ours), "identical": False}
    close = lambda a, b: abs(a - b) if np.isfinite(a) or np.isfinite(b) else 0.0  # noqa: E731 (NaN: empty mask)
    if len(official) != len(ours):
        return out
    if not ours:
        out.update(identical=True, min_iou=1.0, max_iou_pred_diff=0.0, max_stability_diff=0.0)
        return out
    iou = mask_utils.iou([r.segmentation for r in ours], [a["segmentation"] for a in official], [0] * len(ours))
    empty = np.array([r.area == 0 for r in ours])[:, None] & np.array([a["area"] == 0 for a in official])[None]
    iou[empty] = 1.0  # two empty masks are the same mask
    match = iou.argmax(1)
    out["min_iou"] = float(iou.max(1).min())
    out["max_iou_pred_diff"] = float(max(close(r.predicted_iou, official[j]["predicted_iou"]) for r, j in zip(ours, match)))
    out["max_stability_diff"] = float(max(close(r.stability_score, official[j]["stability_score"]) for r, j in zip(ours, match)))
    out["bitwise_equal_records"] = all(json.dumps(r.to_json()) == json.dumps(MaskLike(a)) for r, a in zip(ours, official))
    out["identical"] = (len(set(match.tolist())) == len(ours) and out["min_iou"] >= 0.99
                        and out["max_iou_pred_diff"] <= 1e-4 and out["max_stability_diff"] <= 1e-4)
    return out


def MaskLike(a: dict) -> dict:  # noqa: N802 - the official record in our JSON form
    return {"segmentation": a["segmentation"], "bbox": [float(v) for v in a["bbox"]], "area": int(a["area"]),
            "predicted_iou": float(a["predicted_iou"]), "stability_score": float(a["stability_score"]),
            "point_coords": [[float(x), float(y)] for x, y in a["point_coords"]],
            "crop_box": [float(v) for v in a["crop_box"]]}


def realistic_params(sam, features, emb, base: AmgParams, iou_keep: float, stability_keep: float) -> AmgParams:
    """Thresholds at quantiles of a 64-prompt probe's own scores (see the module docstring)."""
    rng = np.random.default_rng(1)
    h, w = emb.original_size
    points = rng.uniform(0, 1, (64, 2)) * [emb.input_size[1], emb.input_size[0]]
    decoder = PromptDecoder(sam, features)
    masks, iou = decoder(torch.as_tensor(points)[:, None, :], torch.ones(64, 1, dtype=torch.int))
    iou_thresh = float(np.quantile(iou.flatten().numpy(), 1 - iou_keep))
    logits = sam.postprocess_masks(masks[:16], emb.input_size, (h, w)).flatten(0, 1)
    offset = float(logits.std()) / 4  # the official 1.0 is about a quarter of a trained SAM's spread
    threshold = float(logits.median())  # binarise inside the logits' range, as a trained SAM's 0 is
    sam.mask_threshold = threshold
    inter = (logits > threshold + offset).flatten(1).sum(1).float()
    union = (logits > threshold - offset).flatten(1).sum(1).float()
    stab = (inter / union)[union > 0].numpy()
    stab_thresh = max(float(np.quantile(stab, 1 - stability_keep)), 1e-6)
    return dataclasses.replace(base, pred_iou_thresh=iou_thresh, stability_score_thresh=stab_thresh,
                               stability_score_offset=offset)


def run(name: str, sam, emb, image, params: AmgParams) -> dict:
    start = time.perf_counter()
    official = official_generate(sam, emb, image, params)
    t_official = time.perf_counter() - start
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ours = amg.generate(sam, {emb.crop_box: emb}, emb.original_size, params, timings)
    t_ours = time.perf_counter() - start
    result = {"setting": name, "params": dataclasses.asdict(params), "official_s": round(t_official, 2),
              "ours_s": round(t_ours, 2), "speedup": round(t_official / t_ours, 2),
              "ours_decoder_s": round(timings.get("decoder", 0.0), 2),
              "ours_postprocess_s": round(timings.get("postprocess", 0.0), 2), **compare(official, ours)}
    print(f"[{name}] official {t_official:.1f} s, ours {t_ours:.1f} s (decoder {result['ours_decoder_s']} s, "
          f"post-processing {result['ours_postprocess_s']} s): {result['speedup']}x; masks "
          f"{result['official_count']} vs {result['ours_count']}, identical: {result['identical']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1500x2250", help="HxW of the synthetic picture")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--settings", default="realistic,official", help="comma-separated: realistic, official")
    parser.add_argument("--iou-keep", type=float, default=0.3)
    parser.add_argument("--stability-keep", type=float, default=0.5)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]().eval()  # random weights; same layout as the checkpoint
    image = picture(h, w)
    start = time.perf_counter()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    print(f"embedding of the {h}x{w} picture: {time.perf_counter() - start:.1f} s (not timed below)", flush=True)
    emb = StoredEmbedding(predictor.features.numpy().astype(np.float16), "vit_b-random", "bench",
                          (h, w), tuple(predictor.input_size), (0, 0, w, h))
    features = torch.from_numpy(emb.features).float()
    base = AmgParams(points_per_side=args.points_per_side)
    results = []
    for name in args.settings.split(","):
        sam.mask_threshold = 0.0  # the official value; the realistic setting moves it
        params = base if name == "official" else realistic_params(sam, features, emb, base, args.iou_keep,
                                                                   args.stability_keep)
        with torch.inference_mode():
            results.append(run(name, sam, emb, image, params))
    figures = {"bench": "amg", "size": [h, w], "points_per_side": args.points_per_side,
               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
               "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
