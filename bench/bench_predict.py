"""Interactive Predict latency through gRPC with a cached embedding (one point per request).

A real Decoder server on loopback over a vit_b-format checkpoint with random weights (the decoder
is the official 256-dim prompt encoder + mask decoder; weights do not change its cost) and a stored
random 256x64x64 embedding. After warm-up, N requests with one random click each; prints p50, p90,
p99 in ms, then where the time goes (timed inside the server's core on the same requests), and a
JSON line.

    .venv/bin/python bench/bench_predict.py --requests 200 [--multimask] [--height 1500 --width 2250]
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

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

from services.common import keys  # noqa: E402
from services.common.embedding import StoredEmbedding  # noqa: E402
from services.common.grpc_server import build_server, channel_options  # noqa: E402
from services.common.pb import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from bench.models import bench_checkpoint  # noqa: E402
from services.common.sam_models import load_sam  # noqa: E402
from services.common.storage import LocalStore  # noqa: E402
from services.decoder import servicer  # noqa: E402
from services.decoder.core import DecoderCore  # noqa: E402

MiB = 1 << 20


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": len(a)}


def store_embedding(store: LocalStore, model_id: str, size: tuple[int, int], seed: int) -> str:
    h, w = size
    rng = np.random.default_rng(seed)
    features = (rng.standard_normal((1, 256, 64, 64)) * 0.5).astype(np.float16)
    emb = StoredEmbedding(features, model_id, "bench", size, ResizeLongestSide.get_preprocess_shape(h, w, 1024),
                          (0, 0, w, h))
    key = keys.embedding_key(model_id, "bench", emb.crop_box)
    store.put(key, emb.to_bytes())
    return key


def timed(core: DecoderCore, log: list[dict]) -> None:
    """Record DecoderCore.predict's own step timings (ms) for every request the server handles."""
    predict = core.predict

    def wrapper(prompt):
        steps: dict[str, float] = {}
        start = time.perf_counter()
        result = predict(prompt, timings=steps)
        steps["predict_total"] = time.perf_counter() - start
        log.append({name: 1000 * s for name, s in steps.items()}
                   | {"rle_chars": float(np.mean([len(m.segmentation["counts"]) for m in result.masks]))})
        return result

    core.predict = wrapper  # the servicer calls core.predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: a random-weight checkpoint built once in --work-dir")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dataengine-bench")
    parser.add_argument("--height", type=int, default=1500, help="original image height, pixels")
    parser.add_argument("--width", type=int, default=2250, help="original image width, pixels")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--multimask", action="store_true", help="three masks per click instead of one")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = bench_checkpoint(args.model_type, args.checkpoint, args.work_dir, args.seed)
    sam = load_sam(args.model_type, checkpoint, "cpu")
    size = (args.height, args.width)

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "bucket")
        key = store_embedding(store, sam.encoder_id, size, args.seed)
        core = DecoderCore(sam, store, cache_size=4)
        steps_log: list[dict] = []
        timed(core, steps_log)
        server, port = build_server(lambda s: servicer.add_to_server(s, core), "127.0.0.1:0", 64 * MiB)
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 * MiB))
        stub = decoder_pb2_grpc.DecoderStub(channel)
        rng = np.random.default_rng(args.seed)
        clicks = rng.uniform([0, 0], [args.width, args.height], (args.warmup + args.requests, 2))

        latencies = []
        for i, (x, y) in enumerate(clicks):
            request = decoder_pb2.PredictRequest(embedding_key=key, points=[common_pb2.Point(x=x, y=y, label=1)],
                                                 multimask_output=args.multimask)
            t0 = time.perf_counter()
            reply = stub.Predict(request, timeout=60)
            dt = 1000 * (time.perf_counter() - t0)
            assert len(reply.masks) == (3 if args.multimask else 1)
            if i >= args.warmup:  # the first calls load the embedding and warm the allocator
                latencies.append(dt)
        core.flush()
        stats = percentiles(latencies)
        measured = steps_log[args.warmup:]
        steps = {name: float(np.median([m[name] for m in measured])) for name in measured[0]}
        # Client-side latency minus the core's time: proto conversion, gRPC, loopback, threads.
        steps["grpc_and_conversion"] = float(np.median([lat - m["predict_total"]
                                                        for lat, m in zip(latencies, measured)]))
        channel.close()
        server.stop(0).wait()
        core.close()

    print(f"Predict via gRPC, {args.model_type} decoder, image {args.height}x{args.width} (HxW), one point, "
          f"{'multimask (3 masks)' if args.multimask else 'single mask'}, torch threads {torch.get_num_threads()}, "
          f"{stats['n']} requests after {args.warmup} warm-up")
    print(f"  p50 {stats['p50']:.1f} ms   p90 {stats['p90']:.1f} ms   p99 {stats['p99']:.1f} ms   "
          f"mean {stats['mean']:.1f} ms")
    print("  where the time goes (median ms per request, measured inside the server's core):")
    for name, ms in steps.items():
        if name != "rle_chars":
            print(f"    {name:26s} {ms:7.2f}")
    print(f"  masks' RLE: {steps['rle_chars']:.0f} chars (random weights give speckled masks; real SAM "
          "masks encode to far fewer, so RLE and transfer are upper bounds here)")
    print(json.dumps({"bench": "predict", "model_type": args.model_type, "height": args.height,
                      "width": args.width, "multimask": args.multimask, "threads": torch.get_num_threads(),
                      "latency_ms": stats, "breakdown_ms": steps}))


if __name__ == "__main__":
    main()
