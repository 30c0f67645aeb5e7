"""Pipeline throughput and per-item overhead (queue hops plus object store), tiny model.

For each W in --workers: a fresh redis-server, a local-directory object store shared by all
processes, and W Celery worker processes per service (embedder, concepts, decoder, verifier,
orchestrator: 5W processes, one torch thread each). Then:

1. latency: --latency-items images submitted one at a time, each waited for. Per item,
       overhead = (settled - ingested) - critical path of the handlers' own run time,
   with the critical path max(embed, propose) + decode + verify from the manifest's timings
   (each handler's run time, measured inside the worker). What is left is queueing, Celery and
   Redis hops, report handling, manifest reads and writes: the infrastructure. Median and p90 ms.
2. throughput: --images images submitted at once; items/s until all settle.

3. the orchestrator workers' CPU time per item during (2): what limits how many items per second
   one orchestrator process can route.

Baseline: the embedded engine (one process, the same handlers, no queues, one torch thread) on
the same images. Prints a JSON line per configuration.

    .venv/bin/python bench/bench_pipeline.py [--workers 1 2 4] [--images 40] [--latency-items 20]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from services.common.sam_models import load_sam, save_random_checkpoint  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.app.embedded import EmbeddedEngine  # noqa: E402
from services.common.image_source import ImageSource  # noqa: E402
from services.orchestrator.index import PREFIX  # noqa: E402
from services.orchestrator.model import DECODE, EMBED, PROPOSE, SETTLED, VERIFY  # noqa: E402
from services.app.serve import SERVICES  # noqa: E402
from tests.servers import free_port, redis_server, start_celery_worker, stop_worker  # noqa: E402

GRID = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
SETTLED_NAMES = {s.name for s in SETTLED}


def images(n: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append((f"bench-{seed}-{i}.png", buf.getvalue()))
    return out


def wait_settled(client: redis.Redis, ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        states = client.hmget(PREFIX + "meta", list(pending))
        pending = {i for i, s in zip(list(pending), states) if s is None or s.decode().split(":")[0] not in SETTLED_NAMES}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} items did not settle")
        if pending:
            time.sleep(0.001)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead_ms(item) -> float:
    t = item.timings
    critical = max(t[EMBED], t[PROPOSE]) + t[DECODE] + t[VERIFY]
    return 1000 * ((item.history[-1][1] - item.history[0][1]) - critical)


def distributed(workers: int, n_images: int, latency_items: int, checkpoint: Path, tmp: Path,
                metrics: bool = False, on_start: Callable[[list[int]], None] | None = None) -> dict:
    """One configuration. ``metrics``: every worker serves /metrics on a port of its own (and
    counts its tasks); ``on_start`` gets those ports once the workers run (bench_metrics scrapes them)."""
    with ExitStack() as stack:
        (tmp / f"redis-{workers}").mkdir()
        broker = stack.enter_context(redis_server(tmp / f"redis-{workers}"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DATAENGINE_STORE": "local",
               "DATAENGINE_STORE_ROOT": str(tmp / f"store-{workers}"), "DATAENGINE_BROKER_URL": broker,
               "DATAENGINE_MODEL_TYPE": "tiny", "DATAENGINE_CHECKPOINT": str(checkpoint),
               "DATAENGINE_AMG_PARAMS": json.dumps(GRID), "DATAENGINE_EMBED_BATCH_SIZE": "1",
               "DATAENGINE_LOG_LEVEL": "WARNING"}
        settings = Settings(store="local", store_root=tmp / f"store-{workers}", broker_url=broker,
                            amg_params=GRID)
        procs, orchestrators, ports = [], [], []
        for service in ("embedder", "concepts", "decoder", "verifier", "orchestrator"):
            for w in range(workers):
                log = stack.enter_context(open(tmp / f"{service}-{workers}-{w}.log", "wb"))
                if metrics:
                    ports.append(free_port())
                worker_env = {**env, "DATAENGINE_METRICS_PORT": str(ports[-1] if metrics else 0)}
                procs.append(start_celery_worker(service, worker_env, log, "WARNING"))
                if service == "orchestrator":
                    orchestrators.append(procs[-1])
        stack.callback(lambda: [stop_worker(p) for p in procs])
        orchestrator = SERVICES["orchestrator"]().make_core(settings)
        client = redis.Redis.from_url(broker)
        # warm-up: every worker loads its model and connects
        warm = orchestrator.submit([ImageSource(data=d, filename=s) for s, d in images(2 * workers, 1)])
        wait_settled(client, warm, timeout=300)
        if on_start is not None:
            on_start(ports)

        overheads, latencies = [], []
        for source, data in images(latency_items, 2):
            (item_id,) = orchestrator.submit([ImageSource(data=data, filename=source)])
            wait_settled(client, [item_id])
            item = orchestrator.load(item_id)
            overheads.append(overhead_ms(item))
            latencies.append(1000 * (item.history[-1][1] - item.history[0][1]))

        batch = images(n_images, 3)
        cpu_before = [cpu_s(p.pid) for p in procs]
        start = time.perf_counter()
        ids = orchestrator.submit([ImageSource(data=d, filename=s) for s, d in batch])
        wait_settled(client, ids)
        elapsed = time.perf_counter() - start
        cpu_used = {p.pid: cpu_s(p.pid) - before for p, before in zip(procs, cpu_before)}
        states = {}
        for i in ids:
            state = orchestrator.load(i).state.name.lower()
            states[state] = states.get(state, 0) + 1
        orch_ms = 1000 * sum(cpu_used[p.pid] for p in orchestrators) / n_images
        q = statistics.quantiles(overheads, n=10)
        half = len(overheads) // 2  # the same configuration differing from itself
        noise = abs(statistics.median(overheads[:half]) - statistics.median(overheads[half:])) if half else 0.0
        return {"mode": "distributed", "workers_per_service": workers, "processes": 5 * workers,
                "overhead_ms_p50": round(statistics.median(overheads), 2), "overhead_ms_p90": round(q[-1], 2),
                "overhead_noise_ms": round(noise, 2),
                "latency_ms_p50": round(statistics.median(latencies), 1),
                "orchestrator_cpu_ms_per_item": round(orch_ms, 2),
                "items": n_images,
                "items_per_s": round(n_images / elapsed, 2), "states": states}


def embedded(n_images: int, checkpoint: Path, tmp: Path) -> dict:
    torch.set_num_threads(1)
    sam = load_sam("tiny", checkpoint, "cpu")
    engine = EmbeddedEngine(Settings(model_type="tiny", amg_params=GRID, embed_batch_size=1), tmp / "embedded",
                            sam=sam)
    folder = tmp / "embedded-images"
    folder.mkdir()
    files = []
    for source, data in images(n_images, 3):
        (folder / source).write_bytes(data)
        files.append(folder / source)
    engine.process(files[0], "warm-up")
    start = time.perf_counter()
    results = [engine.process(p, p.name) for p in files]
    elapsed = time.perf_counter() - start
    handler_s = []
    for r in results:
        t = engine.orchestrator.load(r.item_id).timings
        handler_s.append(t[EMBED] + t[PROPOSE] + t[DECODE] + t[VERIFY])
    return {"mode": "embedded", "processes": 1, "items": n_images, "items_per_s": round(n_images / elapsed, 2),
            "handler_ms_per_item_p50": round(1000 * statistics.median(handler_s), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--latency-items", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        checkpoint = save_random_checkpoint("tiny", tmp / "tiny.pth")
        print(json.dumps(embedded(args.images, checkpoint, tmp)), flush=True)
        for workers in args.workers:
            print(json.dumps(distributed(workers, args.images, args.latency_items, checkpoint, tmp)), flush=True)


if __name__ == "__main__":
    main()
