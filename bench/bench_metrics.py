"""What the Prometheus metrics cost on the hot paths, with and without them, side by side in one run.

1. gRPC Predict (vit_b decoder, cached embedding, one click): two servers over one core, one with
   the metrics interceptor and one without, requests alternating between them so that drift hits
   both alike. p50 and p90 in ms of each; "noise" is the p50 gap between the even and the odd
   requests of the server without metrics (what the same server differs from itself).
2. Pipeline per-item overhead (bench_pipeline's figure: settled minus the handlers' critical path,
   queueing, Celery and Redis hops), tiny model, one Celery worker per service: once with
   DATAENGINE_METRICS_PORT on every worker and a scraper reading every /metrics each second
   (Prometheus' default is every 15 s), once with metrics off. Median and p90 ms per item; noise:
   the median gap between the two halves of the run without metrics.

    .venv/bin/python bench/bench_metrics.py [--requests 400] [--latency-items 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from bench.bench_pipeline import distributed  # noqa: E402
from bench.bench_predict import MiB, store_embedding  # noqa: E402
from bench.models import bench_checkpoint  # noqa: E402
from services.common.grpc_server import build_server, channel_options  # noqa: E402
from services.common.pb import common_pb2, decoder_pb2, decoder_pb2_grpc  # noqa: E402
from services.common.sam_models import load_sam, save_random_checkpoint  # noqa: E402
from services.common.storage import LocalStore  # noqa: E402
from services.decoder import servicer  # noqa: E402
from services.decoder.core import DecoderCore  # noqa: E402


def p(values: list[float], q: int) -> float:
    return float(np.percentile(np.asarray(values), q))


def predict(requests: int, warmup: int, work_dir: Path) -> dict:
    sam = load_sam("vit_b", bench_checkpoint("vit_b", None, work_dir, 0), "cpu")
    size = (1500, 2250)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "bucket")
        key = store_embedding(store, sam.encoder_id, size, 0)
        core = DecoderCore(sam, store, cache_size=4)
        stubs, servers = {}, []
        for name, on in (("with", True), ("without", False)):
            server, port = build_server(lambda s: servicer.add_to_server(s, core), "127.0.0.1:0", 64 * MiB,
                                        metrics=on)
            server.start()
            servers.append(server)
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 * MiB))
            stubs[name] = decoder_pb2_grpc.DecoderStub(channel)
        clicks = np.random.default_rng(0).uniform([0, 0], [size[1], size[0]], (warmup + requests, 2))
        ms: dict[str, list[float]] = {"with": [], "without": []}
        for i, (x, y) in enumerate(clicks):
            name = "with" if i % 2 else "without"
            request = decoder_pb2.PredictRequest(embedding_key=key, points=[common_pb2.Point(x=x, y=y, label=1)])
            t0 = time.perf_counter()
            stubs[name].Predict(request, timeout=60)
            if i >= warmup:
                ms[name].append(1000 * (time.perf_counter() - t0))
        for server in servers:
            server.stop(0).wait()
        core.close()
    without = ms["without"]
    return {"bench": "predict_grpc", "model": "vit_b", "requests_each": len(without),
            "p50_ms_with": round(p(ms["with"], 50), 2), "p50_ms_without": round(p(without, 50), 2),
            "p90_ms_with": round(p(ms["with"], 90), 2), "p90_ms_without": round(p(without, 90), 2),
            "ratio_p50": round(p(ms["with"], 50) / p(without, 50), 3),
            "noise_p50_ms": round(abs(p(without[::2], 50) - p(without[1::2], 50)), 2)}


class Scraper:
    """Reads every worker's /metrics each ``interval_s`` in a thread, as Prometheus would (harder)."""

    def __init__(self, ports: list[int], interval_s: float = 1.0) -> None:
        self.ports, self.interval_s = ports, interval_s
        self.scrapes, self.errors = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    self.errors += 1  # a worker still loading its model

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def pipeline(latency_items: int, images: int, tmp: Path) -> dict:
    checkpoint = save_random_checkpoint("tiny", tmp / "tiny.pth")
    runs = {}
    for name in ("without", "with"):
        run_dir = tmp / name
        run_dir.mkdir()
        scraper = None

        def on_start(ports: list[int]) -> None:
            nonlocal scraper
            scraper = Scraper(ports).__enter__()

        try:
            runs[name] = distributed(1, images, latency_items, checkpoint, run_dir, metrics=name == "with",
                                     on_start=on_start if name == "with" else None)
        finally:
            if scraper is not None:
                scraper.__exit__()
        if scraper is not None:
            runs[name]["scrapes"] = scraper.scrapes
    without, with_ = runs["without"], runs["with"]
    return {"bench": "pipeline_overhead", "model": "tiny", "workers_per_service": 1, "items": latency_items,
            "overhead_ms_p50_with": with_["overhead_ms_p50"], "overhead_ms_p50_without": without["overhead_ms_p50"],
            "overhead_ms_p90_with": with_["overhead_ms_p90"], "overhead_ms_p90_without": without["overhead_ms_p90"],
            "orchestrator_cpu_ms_per_item_with": with_["orchestrator_cpu_ms_per_item"],
            "orchestrator_cpu_ms_per_item_without": without["orchestrator_cpu_ms_per_item"],
            "noise_p50_ms": without["overhead_noise_ms"], "scrapes": with_.get("scrapes", 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="Predict requests per server")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--latency-items", type=int, default=30)
    parser.add_argument("--images", type=int, default=10, help="throughput batch of each pipeline run")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "dataengine-bench")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    print(json.dumps(predict(2 * args.requests, args.warmup, args.work_dir)), flush=True)
    if not args.skip_pipeline:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(pipeline(args.latency_items, args.images, Path(d))), flush=True)


if __name__ == "__main__":
    main()
