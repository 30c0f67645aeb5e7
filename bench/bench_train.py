"""Fine-tuning throughput of SAM's mask decoder from cached embeddings (``train decoder``'s inner loop).

A vit_b-format checkpoint with random weights (the cost does not depend on them), built in a temp
dir and deleted after; the image encoder is frozen and never runs. N synthetic stored embeddings
(random fp16 1x256x64x64, image 480x640) each with one random-ellipse mask, prepared as
``prompting.prepare`` does, then ``finetune.run_epoch`` (AdamW, the mask decoder trained, first
prompt + ``--rounds`` correction rounds per mask) for ``--epochs``; the first epoch is reported
apart as warm-up. Reference: the same masks and prompt rounds through ``finetune.mask_loss`` under
``torch.no_grad`` (forward only), for the train/inference time ratio. Prints masks/s, s/epoch
(and per 1000 masks), memory (peak RSS, growth over the RSS after loading), the machine, and a
JSON line.

    .venv/bin/python bench/bench_train.py --masks 32 --epochs 2 --rounds 2 --batch-size 4 [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

from services.common.embedding import StoredEmbedding  # noqa: E402
from services.common.sam_models import load_sam, save_random_checkpoint  # noqa: E402
from services.decoder.finetune import TrainConfig, make_optimizer, mask_loss, run_epoch  # noqa: E402
from services.decoder.prompting import Example, prepare  # noqa: E402

H, W = 480, 640


def status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (/proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def examples(n: int, model_id: str, rng: np.random.Generator) -> list[Example]:
    input_size = ResizeLongestSide.get_preprocess_shape(H, W, 1024)
    out = []
    for i in range(n):
        features = (rng.standard_normal((1, 256, 64, 64)) * 0.5).astype(np.float16)
        emb = StoredEmbedding(features, model_id, f"img{i}", (H, W), input_size, (0, 0, W, H))
        mask = np.zeros((H, W), np.uint8)
        centre = (int(rng.integers(100, W - 100)), int(rng.integers(100, H - 100)))
        axes = (int(rng.integers(20, 100)), int(rng.integers(20, 100)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        out.append(Example(f"item{i}", emb, mask.astype(bool)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="correction rounds after the first prompt")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_random_checkpoint("vit_b", Path(tmp) / "sam_vit_b_random.pth", seed=args.seed)
        loaded = load_sam("vit_b", checkpoint, args.device)
    sam, device = loaded.model, loaded.device
    encoder_id = getattr(loaded, "encoder_id", None) or loaded.model_id  # what stored embeddings carry
    config = TrainConfig(epochs=args.epochs, rounds=args.rounds, batch_size=args.batch_size, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    targets = [prepare(sam, e, device) for e in examples(args.masks, encoder_id, rng)]
    optimizer = make_optimizer(sam, config)
    trainable = sum(p.numel() for p in sam.parameters() if p.requires_grad)

    baseline = status_mib("VmRSS")
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:  # reset VmHWM so the peak below is training's, not the checkpoint load's
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    epoch_s, losses = [], []
    for epoch in range(args.epochs):
        sync()
        t0 = time.perf_counter()
        losses.append(run_epoch(sam, targets, optimizer, rng, config, epoch)["loss"])
        sync()
        epoch_s.append(time.perf_counter() - t0)
    peak_training = status_mib("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak = peak_training if hwm_reset else maxrss

    # Reference, warm, after training's peak is read: forward only, same prompt rounds, no gradients.
    sam.eval()
    with torch.no_grad():
        mask_loss(sam, targets[0], rng, config)  # warm-up
        sync()
        t0 = time.perf_counter()
        for target in targets:
            mask_loss(sam, target, rng, config)
        sync()
        infer_s = time.perf_counter() - t0

    steady = epoch_s[1:] or epoch_s
    per_epoch = float(np.mean(steady))
    rate = args.masks / per_epoch
    infer_rate = args.masks / infer_s
    decodes = 1 + args.rounds
    print(f"Decoder fine-tuning, vit_b (mask decoder, {trainable / 1e6:.2f} M trainable weights; encoder frozen, "
          f"not run), {args.masks} masks {H}x{W}, {decodes} decodes per mask (1 first prompt + {args.rounds} "
          f"corrections), batch {args.batch_size}, device {device}")
    print(f"  machine: {cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} (1 min)"
          + (f", {torch.cuda.get_device_name(device)}" if cuda else ""))
    if len(epoch_s) > 1:
        print(f"  epoch 1 (warm-up)  {epoch_s[0]:8.2f} s   {args.masks / epoch_s[0]:7.2f} masks/s")
    print(f"  train {'(epochs 2..)' if len(epoch_s) > 1 else '(1 epoch)  '} {per_epoch:8.2f} s/epoch   "
          f"{rate:7.2f} masks/s   {1000 / rate:8.1f} s per 1000 masks   {1000 * per_epoch / args.masks / decodes:6.1f} "
          f"ms per decode step")
    print(f"  inference ref      {infer_s:8.2f} s/pass    {infer_rate:7.2f} masks/s   {1000 / infer_rate:8.1f} s per "
          f"1000 masks   (forward only, same rounds, no_grad)")
    print(f"  train / inference  {infer_rate / rate:8.2f} x time per mask")
    print(f"  memory: RSS after load {baseline:.0f} MiB; peak during training {peak:.0f} MiB "
          f"(+{peak - baseline:.0f} MiB); ru_maxrss {maxrss:.0f} MiB at the end, {load_peak:.0f} MiB before "
          f"training (building and loading the checkpoint)"
          + (f"; CUDA peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if cuda else ""))
    print(f"  loss per epoch: {', '.join(f'{v:.3f}' for v in losses)}")
    print(json.dumps({"bench": "train", "model_type": "vit_b", "device": str(device), "masks": args.masks,
                      "epochs": args.epochs, "rounds": args.rounds, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "epoch_s": [round(s, 3) for s in epoch_s],
                      "masks_per_s": round(rate, 3), "infer_masks_per_s": round(infer_rate, 3),
                      "train_over_infer": round(infer_rate / rate, 3), "rss_after_load_mib": round(baseline),
                      "peak_training_mib": round(peak), "ru_maxrss_mib": round(maxrss),
                      "ru_maxrss_before_training_mib": round(load_peak)}))


if __name__ == "__main__":
    main()
