"""Embedding throughput: our batched EmbedderCore against a loop of the official
``SamPredictor.set_image``, same weights, same images; and each one's peak memory.

Every measurement runs in its own child process (so one run's allocations cannot inflate
another's peak RSS): build the model from a checkpoint of the official format with random
weights (weights do not change the cost), warm up on one image, then embed the same N images.
Peak memory is ``ru_maxrss`` of the child, also given above the RSS after the model load.
The children's features are compared with the official ones (ours are stored in fp16).

    .venv/bin/python bench/bench_embed.py [--model-type vit_b|tiny] [--images 2]
        [--batch-sizes 1,2] [--height 480 --width 640] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def make_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """n HxWx3 uint8 images; smooth gradients plus noise, so resizing does real work."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for _ in range(n):
        base = (np.sin(xx / rng.uniform(5, 50)) + np.cos(yy / rng.uniform(5, 50))) * 60 + 128
        noise = rng.normal(0, 20, (height, width, 3))
        out.append(np.clip(base[:, :, None] + noise, 0, 255).astype(np.uint8))
    return out


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> None:
    """One measurement; prints a JSON line and saves the features (fp32) to --features-out."""
    import torch
    from segment_anything import SamPredictor

    from services.common.sam_models import load_sam
    from services.embedder.core import EmbedderCore

    torch.set_num_threads(args.threads) if args.threads else None
    sam = load_sam(args.model_type, args.checkpoint, args.device)
    images = make_images(args.images, args.height, args.width)
    warmup = make_images(1, args.height, args.width, seed=99)
    loaded_rss = _rss_mib()

    if args.child == "official":
        predictor = SamPredictor(sam.model)

        def run(batch: list[np.ndarray]) -> list[np.ndarray]:
            feats = []
            for image in batch:
                predictor.set_image(image)
                feats.append(predictor.features.float().cpu().numpy())
            return feats
    else:
        core = EmbedderCore(sam, None, batch_size=args.batch_size, max_pixels=10**9)

        def run(batch: list[np.ndarray]) -> list[np.ndarray]:
            return [embs[0].features.astype(np.float32) for embs in core.compute(batch)]

    run(warmup)
    if sam.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats = run(images)
    if sam.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    np.save(args.features_out, np.concatenate(feats))
    print(json.dumps({"impl": args.child, "batch_size": args.batch_size if args.child == "ours" else 1,
                      "images": args.images, "seconds": seconds, "images_per_s": args.images / seconds,
                      "rss_after_load_mib": loaded_rss, "peak_rss_mib": _rss_mib()}))


def _run_child(args: argparse.Namespace, impl: str, batch_size: int, checkpoint: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--batch-size", str(batch_size),
           "--checkpoint", str(checkpoint), "--features-out", str(out), "--model-type", args.model_type,
           "--images", str(args.images), "--height", str(args.height), "--width", str(args.width),
           "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} (batch {batch_size}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "tiny"])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,2")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    # internal: one measurement
    parser.add_argument("--child", choices=["official", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--features-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from services.common.sam_models import save_random_checkpoint

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_random_checkpoint(args.model_type, tmp / f"{args.model_type}.pth", seed=0)
        official = _run_child(args, "official", 1, ckpt, tmp / "official.npy")
        reference = np.load(tmp / "official.npy")
        rows = [official]
        for b in batch_sizes:
            row = _run_child(args, "ours", b, ckpt, tmp / f"ours{b}.npy")
            diff = np.abs(np.load(tmp / f"ours{b}.npy") - reference)
            # fp16 storage: the error is relative to each value's magnitude
            row["max_abs_diff_vs_official"] = float(diff.max())
            row["max_rel_diff_vs_official"] = float((diff / np.maximum(np.abs(reference), 1e-3)).max())
            row["speedup_vs_official"] = row["images_per_s"] / official["images_per_s"]
            rows.append(row)

    summary = {"model_type": args.model_type, "images": args.images, "image_size": [args.height, args.width],
               "device": args.device, "results": rows}
    print(f"{args.model_type}, {args.images} images of {args.height}x{args.width}, device {args.device}")
    print(f"{'impl':<20}{'images/s':>10}{'speedup':>9}{'peak RSS MiB':>14}{'after load':>12}{'max rel diff':>14}")
    for r in rows:
        name = "official set_image" if r["impl"] == "official" else f"ours batch={r['batch_size']}"
        print(f"{name:<20}{r['images_per_s']:>10.3f}{r.get('speedup_vs_official', 1.0):>8.2f}x"
              f"{r['peak_rss_mib']:>14.0f}{r['rss_after_load_mib']:>12.0f}"
              f"{r.get('max_rel_diff_vs_official', 0.0):>14.2e}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
