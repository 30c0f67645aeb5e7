"""The pipeline's added cost per instance of a phrase: 1, 10 and 50 instances side by side.

What an instance costs after grounding, on this CPU: the decode step's one Predict per box with a
cached embedding (the official prompt encoder and mask decoder of a vit_b-format checkpoint with
random weights: weights do not change the cost), the mask's RLE, and the offline (heuristic)
verifier's mask verdict over it. Grounding itself is the model's cost (seconds of SAM 3 or a
detector on a GPU), not the pipeline's, and is not measured. Prints a table (ms in all and per
instance, median of --repeats runs) and a JSON line.

    .venv/bin/python bench/bench_instances.py [--counts 1 10 50] [--height 1500 --width 2250]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_predict import store_embedding  # noqa: E402
from services.common.concepts import Instance, NounPhrase  # noqa: E402
from bench.models import bench_checkpoint  # noqa: E402
from services.common.sam_models import load_sam  # noqa: E402
from services.common.storage import LocalStore  # noqa: E402
from services.decoder.core import DecoderCore  # noqa: E402
from services.decoder.step import ground  # noqa: E402
from services.verifier.core import PhrasePair, VerifierCore  # noqa: E402


def phrase_with(n: int, size: tuple[int, int], rng: np.random.Generator) -> NounPhrase:
    """A phrase with ``n`` boxes of 2-20% of the image's side, anywhere in it."""
    h, w = size
    instances = []
    for _ in range(n):
        bw, bh = rng.uniform(0.02, 0.2) * w, rng.uniform(0.02, 0.2) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        instances.append(Instance(box=(x0, y0, x0 + bw, y0 + bh), score=0.9, source="bench"))
    return NounPhrase("thing", 0.9, "bench", tuple(instances))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    checkpoint = bench_checkpoint(args.model_type, None, args.work_dir, args.seed)
    sam = load_sam(args.model_type, checkpoint, "cpu")
    size = (args.height, args.width)
    rng = np.random.default_rng(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "bucket")
        key = store_embedding(store, sam.encoder_id, size, args.seed)
        decoder, verifier = DecoderCore(sam, store, cache_size=4), VerifierCore("heuristic")
        ground(decoder, key, phrase_with(2, size, rng))  # warm-up: the embedding read and cached
        for n in args.counts:
            decode_ms, verify_ms = [], []
            for _ in range(args.repeats):
                phrase = phrase_with(n, size, rng)
                t0 = time.perf_counter()
                masks = ground(decoder, key, phrase)  # n Predicts, each mask to RLE
                t1 = time.perf_counter()
                result = verifier.verify([PhrasePair(phrase.text, masks)])
                t2 = time.perf_counter()
                assert len(masks) == n and sum(v.check == "mask" for v in result.pairs[0].verdicts) == n
                decode_ms.append((t1 - t0) * 1000)
                verify_ms.append((t2 - t1) * 1000)
            d, v = float(np.median(decode_ms)), float(np.median(verify_ms))
            rows.append({"instances": n, "decode_ms": d, "verify_ms": v, "total_ms": d + v,
                         "per_instance_ms": (d + v) / n})
        decoder.close()

    print(f"\n{args.model_type} decoder, {size[0]}x{size[1]} image, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"{'instances':>9} {'decode ms':>10} {'verify ms':>10} {'total ms':>9} {'per instance':>13}")
    for r in rows:
        print(f"{r['instances']:>9} {r['decode_ms']:>10.1f} {r['verify_ms']:>10.1f} {r['total_ms']:>9.1f} "
              f"{r['per_instance_ms']:>10.1f} ms")
    print(json.dumps({"bench": "instances", "model_type": args.model_type, "size": size, "rows": rows}))


if __name__ == "__main__":
    main()
