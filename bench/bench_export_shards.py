"""Export throughput: the unsharded export against the sharded one with 1, 2 ... worker processes.

Seeds ``--items`` items into a local store in ``--work-dir`` by direct manifest writes (no models):
each with three phrases (two with two masks, one hard negative), a grid-mask document of
``--grid-masks`` masks and ``--image-kb`` of image bytes, as the engine leaves an accepted item.
Then, per format: ``exports.export`` (one process, the files of today's export), ``--shards`` shards
with each ``--workers`` count (a fresh folder each), and a resume of a finished sharded export (the
check of every shard's sha256, nothing rewritten). Prints a table (seconds, items/s; the median of
``--repeats`` runs) and a JSON line. Worker processes are spawned, about 0.4 s each to start.

    .venv/bin/python bench/bench_export_shards.py [--items 2000] [--shards 8] [--workers 1 2] [--formats coco sa1b]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from services.common.masks import MaskRecord, encode_rle, sa1b_document  # noqa: E402
from services.common.storage import LocalStore  # noqa: E402
from services.orchestrator import exports, shards  # noqa: E402
from services.orchestrator.model import Item, ItemState, PhraseResult, item_id_for, manifest_key  # noqa: E402

H, W = 256, 384


def _mask(rng: np.random.Generator) -> MaskRecord:
    y0, x0, h, w = int(rng.integers(0, H - 40)), int(rng.integers(0, W - 40)), int(rng.integers(8, 40)), int(rng.integers(8, 40))
    m = np.zeros((H, W), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return MaskRecord(segmentation=encode_rle(m), bbox=[x0, y0, w, h], area=int(m.sum()), predicted_iou=0.9,
                      stability_score=0.95, point_coords=[[x0 + 1.0, y0 + 1.0]], crop_box=[0, 0, W, H])


def seed(store: LocalStore, n: int, grid_masks: int, image_kb: int) -> None:
    rng = np.random.default_rng(0)
    masks = [_mask(rng) for _ in range(64)]  # reused: encoding is not what is measured
    image = b"\xff\xd8\xff\xe0" + rng.bytes(image_kb * 1024)
    for i in range(n):
        source = f"photos/{i:07d}.jpg"
        image_id = hashlib.sha256(source.encode()).hexdigest()
        grid_key = f"masks/bench/{image_id}/p.json"
        store.put(grid_key, json.dumps(sa1b_document(image_id, (H, W), [masks[(i + k) % 64] for k in range(grid_masks)])).encode())
        store.put(f"images/{image_id}", image)
        phrases = [PhraseResult(p, masks=[masks[(i + k) % 64] for k in range(2)], grounded=True, score=0.93,
                                provenance="bench", state=ItemState.ACCEPTED) for p in ("dog", "frisbee")]
        phrases.append(PhraseResult("wolf", is_negative=True, score=0.8, provenance="bench", state=ItemState.ACCEPTED))
        item = Item(item_id=item_id_for(source, image_id), source=source, image_key=f"images/{image_id}",
                    image_id=image_id, state=ItemState.ACCEPTED, height=H, width=W, phrases=phrases,
                    grid_masks_key=grid_key)
        store.put(manifest_key(item.item_id), json.dumps(item.to_json()).encode())


def timed(fn, repeats: int = 1, fresh: Path | None = None) -> float:
    """Median seconds of ``repeats`` calls; ``fresh`` (a file or folder) is removed before each."""
    runs = []
    for _ in range(repeats):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True) if fresh.is_dir() else fresh.unlink(missing_ok=True)
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["coco", "sa1b"])
    parser.add_argument("--grid-masks", type=int, default=16)
    parser.add_argument("--image-kb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.work_dir))
    try:
        store = LocalStore(work / "bucket")
        seed_s = timed(lambda: seed(store, args.items, args.grid_masks, args.image_kb))
        rows = []
        for fmt in args.formats:
            dest = work / ("whole" if fmt == "sa1b" else f"whole-{fmt}.json")
            rows.append((fmt, "unsharded", 1, timed(lambda: exports.export(store, fmt, dest, None), args.repeats, dest)))
            for workers in args.workers:
                out = work / f"{fmt}-{workers}"
                run = functools.partial(shards.export_shards, functools.partial(LocalStore, store.root),
                                        shards.FolderTarget(out), shards.ShardedExport(fmt, args.shards), workers)
                rows.append((fmt, f"{args.shards} shards", workers, timed(run, args.repeats, out)))
            rows.append((fmt, f"{args.shards} shards, resumed when done", args.workers[-1], timed(run, args.repeats)))
            shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{args.items} items (seeded in {seed_s:.1f} s), {args.grid_masks} grid masks and {args.image_kb} KB "
          f"of image each; median of {args.repeats}")
    print(f"{'format':<7} {'export':<32} {'workers':>7} {'seconds':>8} {'items/s':>8}")
    for fmt, kind, workers, seconds in rows:
        print(f"{fmt:<7} {kind:<32} {workers:>7} {seconds:>8.2f} {args.items / seconds:>8.0f}")
    print(json.dumps({"items": args.items, "shards": args.shards, "results": [
        {"format": f, "export": k, "workers": w, "seconds": round(s, 3), "items_per_s": round(args.items / s, 1)}
        for f, k, w, s in rows]}))


if __name__ == "__main__":
    main()
