"""The orchestrator, the review desk and the exports at 10^4 .. 10^6 items (issue 26), no models.

Items are seeded by direct manifest writes, no models (bench/scale_seed.py: ``Item`` manifests
under ``manifest_key`` in a ``LocalStore``, put into a real redis-server's index through
``RedisIndex``), incrementally: the first size, measure, grow to the next, measure, and so on.
At each size, against one ``Orchestrator`` served over real gRPC on loopback:

- Redis memory per item: INFO ``used_memory`` minus the empty server's, over the items;
- p50 / p99 ms of NextReview + ReleaseReview (claim then skip, round-robin over --annotators
  names), GetItem (a random item), one ListItems page of 100 (the first, then the one after it)
  and Stats: up to --requests calls each or --op-budget-s seconds, and the p50 ratio to the first size;
- a full ListItems walk (pages of 1000): items/s, cut at --walk-budget-s (then "cut" and the rate so far);
- routing: ``Orchestrator.report`` of the verify step for --route items in flight at
  masks_decoded (stub decode and verify outputs shared by all), the dispatcher a no-op: items/s;
- reconcile: ``Orchestrator.resume()`` (index rebuilt from every manifest), no-op dispatcher;
- export: ``exports.export(store, "coco", path, DATASET_STATES)`` in a child process: items/s
  and its peak RSS (VmHWM), and its peak before the export started (imports: the interpreter's own).

Then an extrapolation from the largest size to SA-1B (11 M images) and SA-Co (5.2 M): Redis
memory, orchestrator processes for 10,000 images/hour (4 reports an image: embed, propose,
decode, verify, each costed as a verify report, the heaviest), export and reconcile hours.
Prints a JSON line per size, then the tables. The store lives in a directory made under --dir
(default: the temp dir), removed at the end unless --keep.

    .venv/bin/python bench/bench_scale.py [--sizes 10000,100000,1000000] [--quick] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import redis  # noqa: E402

from bench import scale_seed  # noqa: E402
from services.common.grpc_server import build_server, client_channel  # noqa: E402
from services.common.pb import orchestrator_pb2 as pb, orchestrator_pb2_grpc  # noqa: E402
from services.common.queues import TaskOutcome  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.common.steps import StepReport  # noqa: E402
from services.common.storage import LocalStore  # noqa: E402
from services.orchestrator.engine import Orchestrator  # noqa: E402
try:
    from services.orchestrator.redis_index import RedisIndex  # noqa: E402
except ImportError:  # before the index had its own module
    from services.orchestrator.index import RedisIndex  # noqa: E402
from services.orchestrator.model import VERIFY  # noqa: E402
from services.orchestrator.servicer import add_to_server  # noqa: E402
from tests.servers import redis_server  # noqa: E402

MiB = 1 << 20
TARGETS = (("SA-1B", 11_000_000), ("SA-Co", 5_200_000))
IMAGES_PER_HOUR, REPORTS_PER_IMAGE, EXPORT_WORKERS = 10_000, 4, (1, 8, 64)


class Recorder:
    """The dispatcher: counts what would be sent, sends nothing."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, request) -> None:
        self.sent += 1


def pct(values: list[float], q: int) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 2) if values else float("nan")


def check_disk(path: Path, items: int) -> None:
    """Refuse to start when the store cannot fit: ~9 KB and two inodes an item (a directory and a file)."""
    st = os.statvfs(path)
    free, inodes = st.f_bavail * st.f_frsize, st.f_favail
    need = items * 9 * 1024
    print(f"# disk at {path}: {free / 1e9:.1f} GB and {inodes:,} inodes free; {items:,} items need "
          f"~{need / 1e9:.1f} GB and {2 * items:,} inodes", flush=True)
    if free < need * 1.2 or (inodes and inodes < 2.2 * items):
        sys.exit(f"not enough disk under {path} for {items:,} items: pass --dir elsewhere or smaller --sizes")


def seed(root: Path, url: str, start: int, stop: int, procs: int) -> dict:
    jobs = [(str(root), url, lo, min(stop, lo + 5000)) for lo in range(start, stop, 5000)]
    t0 = time.perf_counter()
    out = {"items": 0, "bytes": 0, "in_flight": [], "by_state": {}}
    with multiprocessing.get_context("spawn").Pool(procs) as pool:  # spawn: the parent serves gRPC
        for part in pool.imap_unordered(scale_seed.seed_range, jobs):
            out["items"] += part["items"]
            out["bytes"] += part["bytes"]
            out["in_flight"] += part["in_flight"]
            for k, v in part["by_state"].items():
                out["by_state"][k] = out["by_state"].get(k, 0) + v
    out["seconds"] = time.perf_counter() - t0
    return out


def timed(fn, n: int, budget_s: float, warmup: int = 3) -> list[float]:
    """ms of ``fn(k)`` for k = 0.., up to ``n`` calls or ``budget_s`` seconds (at least 5 calls)."""
    for k in range(warmup):
        fn(-1 - k)
    ms, deadline = [], time.monotonic() + budget_s
    for k in range(n):
        t0 = time.perf_counter()
        fn(k)
        ms.append(1000 * (time.perf_counter() - t0))
        if time.monotonic() > deadline and len(ms) >= 5:
            break
    return ms


def latencies(stub, size: int, args) -> dict:
    rng = random.Random(size)
    names = [f"annotator-{a:02d}" for a in range(args.annotators)]
    turn = iter(range(10 ** 9))

    def claim(_):
        name = names[next(turn) % len(names)]
        item = stub.NextReview(pb.NextReviewRequest(annotator=name), timeout=600)
        stub.ReleaseReview(pb.LeaseRequest(item_id=item.item_id, annotator=name, lease_token=item.lease.token),
                           timeout=600)

    first = stub.ListItems(pb.ListItemsRequest(page_size=100), timeout=600).next_page_token

    def page(k):
        stub.ListItems(pb.ListItemsRequest(page_size=100, page_token=first if k % 2 else ""), timeout=600)

    calls = {"claim": claim,
             "get": lambda _: stub.GetItem(pb.GetItemRequest(item_id=scale_seed.item_id(rng.randrange(size))),
                                           timeout=600),
             "page": page, "stats": lambda _: stub.Stats(pb.StatsRequest(), timeout=600)}
    out = {}
    for name, fn in calls.items():
        ms = timed(fn, args.requests, args.op_budget_s)
        out[name] = {"p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "calls": len(ms)}
    return out


def walk(stub, size: int, budget_s: float) -> dict:
    token, items, t0 = "", 0, time.perf_counter()
    while True:
        resp = stub.ListItems(pb.ListItemsRequest(page_size=1000, page_token=token), timeout=600)
        items += len(resp.items)
        token = resp.next_page_token
        if not token or time.perf_counter() - t0 > budget_s:
            break
    s = time.perf_counter() - t0
    return {"items": items, "seconds": round(s, 2), "items_per_s": round(items / s, 1), "complete": not token,
            "full_s_est": round(s if not token else size / (items / s), 1)}


def route(orch: Orchestrator, numbers: list[int]) -> dict:
    ms = []
    t0 = time.perf_counter()
    for n in numbers:
        k = scale_seed.item_id(n)
        key = scale_seed.verify_key(n % len(scale_seed.VERIFY_SCORES))
        t1 = time.perf_counter()
        item = orch.report(StepReport(k, VERIFY, TaskOutcome(ok=True, outputs={"verify_key": key}), elapsed_s=0.5))
        ms.append(1000 * (time.perf_counter() - t1))
        assert item is not None and item.settled, f"item {k} was not routed: {item and item.state.name}"
    s = time.perf_counter() - t0
    return {"items": len(numbers), "items_per_s": round(len(numbers) / s, 1) if numbers else float("nan"),
            "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99)}


def peak_rss_mb() -> float:
    """This process's peak RSS: /proc's VmHWM (ru_maxrss would count the forking parent's pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def export_child(root: str, out: str) -> None:
    """Run in a child process: one export, then its figures as a JSON line on stdout."""
    from services.orchestrator import exports

    base = peak_rss_mb()
    t0 = time.perf_counter()
    summary = exports.export(LocalStore(Path(root)), "coco", Path(out), exports.DATASET_STATES)
    s = time.perf_counter() - t0
    print(json.dumps({"items": summary.items, "seconds": round(s, 2), "base_rss_mb": base,
                      "peak_rss_mb": peak_rss_mb(), "out_mb": round(Path(out).stat().st_size / MiB, 1)}))


def export(root: Path, work: Path) -> dict:
    out = work / "coco.json"
    proc = subprocess.run([sys.executable, __file__, "--export-child", str(root), str(out)], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"export child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    figures["items_per_s"] = round(figures["items"] / figures["seconds"], 1)
    return figures


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def measure(size: int, args, ctx: dict) -> dict:
    store, orch, stub = ctx["store"], ctx["orch"], ctx["stub"]
    row: dict = {"bench": "scale", "items": size}
    s = seed(store.root, ctx["url"], ctx["seeded"], size, args.procs)
    ctx["seeded"], ctx["bytes"] = size, ctx["bytes"] + s["bytes"]
    ctx["in_flight"] += sorted(s["in_flight"])
    row["seed_s"] = round(s["seconds"], 1)
    row["manifest_bytes"] = round(ctx["bytes"] / size)
    row["redis_bytes_per_item"] = round((used_memory(ctx["client"]) - ctx["mem0"]) / size, 1)
    print(f"# {size:,} items seeded (+{s['items']:,} in {s['seconds']:.1f} s, {s['by_state']}); "
          f"{time.perf_counter() - ctx['t0']:.0f} s since the start", flush=True)
    t0 = time.perf_counter()
    row.update(latencies(stub, size, args))
    row["walk"] = walk(stub, size, args.walk_budget_s)
    numbers, ctx["in_flight"] = ctx["in_flight"][:args.route], ctx["in_flight"][args.route:]
    row["route"] = route(orch, numbers)
    dispatcher = orch.dispatcher
    t1 = time.perf_counter()
    orch.resume()
    rs = time.perf_counter() - t1
    row["reconcile"] = {"seconds": round(rs, 2), "items_per_s": round(size / rs, 1), "redispatched": dispatcher.sent}
    dispatcher.sent = 0
    row["export"] = export(store.root, ctx["work"])
    row["measure_s"] = round(time.perf_counter() - t0, 1)
    return row


def ratio(rows: list[dict], row: dict, op: str) -> str:
    return f"{row[op]['p50_ms'] / rows[0][op]['p50_ms']:.1f}x"


def tables(rows: list[dict]) -> None:
    first = f"{rows[0]['items']:,}"
    ops = (("claim", "NextReview+Release"), ("get", "GetItem"), ("page", "ListItems page"), ("stats", "Stats"))
    print(f"\n| items | Redis B/item | manifest B | " + " | ".join(
        f"{label} p50 / p99 ms | x vs {first}" for _, label in ops) + " |")
    print("|---" * (3 + 2 * len(ops)) + "|")
    for r in rows:
        print(f"| {r['items']:,} | {r['redis_bytes_per_item']:.0f} | {r['manifest_bytes']} | " + " | ".join(
            f"{r[op]['p50_ms']} / {r[op]['p99_ms']} | {ratio(rows, r, op)}" for op, _ in ops) + " |")
    print("\n| items | full ListItems walk items/s | walk time | routing items/s (report p50 ms) | reconcile s "
          "(items/s) | export coco items/s | export peak RSS MB (before) | seed s |")
    print("|---" * 8 + "|")
    for r in rows:
        w, ro, rc, e = r["walk"], r["route"], r["reconcile"], r["export"]
        walk_time = (f"{w['seconds']} s" if w["complete"]
                     else f"cut after {w['items']:,} items, ~{w['full_s_est']:.0f} s est.")
        print(f"| {r['items']:,} | {w['items_per_s']:,} | {walk_time} | {ro['items_per_s']} ({ro['p50_ms']}) | "
              f"{rc['seconds']} ({rc['items_per_s']:,}) | {e['items_per_s']:,} | {e['peak_rss_mb']} "
              f"({e['base_rss_mb']}) | {r['seed_s']} |")
    last = rows[-1]
    per_process = last["route"]["items_per_s"] * 3600 / REPORTS_PER_IMAGE
    print(f"\nExtrapolated from {last['items']:,} items (Redis bytes/item, routing, export and reconcile rates "
          f"measured there; export workers assumed to scale linearly over shards):\n")
    print("| dataset | images | Redis GB | images/h per orchestrator process | processes for 10,000 images/h | "
          + " | ".join(f"export h on {w}" for w in EXPORT_WORKERS) + " | reconcile h (1 process) |")
    print("|---" * (6 + len(EXPORT_WORKERS)) + "|")
    for name, n in TARGETS:
        exp = last["export"]["items_per_s"]
        print(f"| {name} | {n:,} | {last['redis_bytes_per_item'] * n / 1e9:.1f} | {per_process:,.0f} | "
              f"{math.ceil(IMAGES_PER_HOUR / per_process)} | "
              + " | ".join(f"{n / (exp * w) / 3600:.2f}" for w in EXPORT_WORKERS)
              + f" | {n / last['reconcile']['items_per_s'] / 3600:.2f} |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--export-child":
        return export_child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="item counts, ascending, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a smoke run: sizes 1000,5000 and few calls")
    parser.add_argument("--dir", type=Path, default=None,
                        help="the directory to make the run's own directory in (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="leave the run's directory (store, redis) in place")
    parser.add_argument("--requests", type=int, default=200, help="calls per latency figure")
    parser.add_argument("--op-budget-s", type=float, default=30.0, help="seconds per latency figure, at most")
    parser.add_argument("--walk-budget-s", type=float, default=120.0, help="seconds of full walk, at most")
    parser.add_argument("--route", type=int, default=500, help="verify reports routed per size")
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2, help="seeding processes")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.requests, args.op_budget_s, args.walk_budget_s, args.route = "1000,5000", 30, 5, 20, 100
    sizes = [int(s) for s in args.sizes.split(",")]
    if sizes != sorted(set(sizes)) or sizes[0] <= 0:
        sys.exit("--sizes must be ascending positive item counts")
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="dataengine-scale-", dir=args.dir))  # removed whole at the end
    check_disk(base, sizes[-1])
    (base / "redis").mkdir(exist_ok=True)
    (base / "work").mkdir(exist_ok=True)
    try:
        with redis_server(base / "redis") as url:
            client = redis.Redis.from_url(url)
            store = LocalStore(base / "store")
            scale_seed.write_stubs(store)
            orch = Orchestrator.from_settings(Settings(store_root=base / "store"), store, RedisIndex(url), Recorder())
            server, port = build_server(lambda s: add_to_server(s, orch), "127.0.0.1:0", 64 * MiB, workers=4,
                                        metrics=False, reflection_on=False)
            server.start()
            channel = client_channel(f"127.0.0.1:{port}", 64 * MiB)
            ctx = {"url": url, "client": client, "mem0": used_memory(client), "store": store, "orch": orch,
                   "stub": orchestrator_pb2_grpc.OrchestratorStub(channel), "seeded": 0, "bytes": 0,
                   "in_flight": [], "work": base / "work", "t0": time.perf_counter()}
            rows = []
            try:
                for size in sizes:
                    rows.append(measure(size, args, ctx))
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                channel.close()
                server.stop(0).wait()
            tables(rows)
    finally:
        if args.keep:
            print(f"# kept {base}")
        else:
            t0 = time.perf_counter()
            # rm -rf: ~10x faster than shutil.rmtree on a million small files here
            if shutil.which("rm") is None or subprocess.run(["rm", "-rf", str(base)]).returncode != 0:
                shutil.rmtree(base, ignore_errors=True)
            print(f"# removed {base} in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
