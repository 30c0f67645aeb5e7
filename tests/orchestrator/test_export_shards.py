"""Sharded exports: shards equal the unsharded export item for item, each item in exactly one shard,
resume after a failure, a kill or a damaged shard without redoing finished shards or duplicating
items; the CLI's errors; the Celery task on a real worker process (slow)."""

from __future__ import annotations

import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.app.cli import app as cli_app
from services.common.errors import InvalidInput
from services.common.masks import sa1b_document
from services.common.settings import Settings
from services.common.storage import LocalStore
from services.orchestrator import exports, shards
from services.orchestrator.exports import Shard, shard_of
from services.orchestrator.model import Item, ItemState
from services.orchestrator.shard_files import file_sha256
from services.orchestrator.shards import FolderTarget, ShardedExport, StoreTarget
from tests.orchestrator.test_exports import H, W, mask, negative, positive, save

S = ItemState
N_ITEMS, N_SHARDS = 24, 4
PNG = b"\x89PNG\r\n\x1a\n"


def build(store) -> list[str]:
    """N_ITEMS items, varied as the engine leaves them: grid masks or none, phrase masks, negatives,
    image-level labels, three states, two sources with the same stem; plus an unreadable manifest.
    Returns the exported (dataset-state) item ids."""
    ids = []
    for i in range(N_ITEMS):
        grid_key = ""
        if i % 3:
            grid_key = f"masks/m/{i}/p.json"
            store.put(grid_key, json.dumps(sa1b_document(f"img{i}", (H, W), [mask(i % 9, 0), mask(0, i % 11)])).encode())
        phrases = [positive("dog", mask(1, 1), mask(i % 12, 2)), negative("wolf")] if i % 2 else [positive("sky")]
        state = (S.ACCEPTED, S.REVIEW, S.REJECTED, S.FAILED)[i % 4]
        item = save(store, f"dir{i % 2}/photo{i // 2}.jpg" if i < 4 else f"img{i}.jpg", phrases, state, grid_key)
        store.put(item.image_key, PNG + bytes([i]) * 20)
        if state != S.FAILED:
            ids.append(item.item_id)
    store.put("items/zzbroken/manifest.json", b"{not json")
    return ids


@pytest.fixture
def store(local_store):
    build(local_store)
    return local_store


def factory(store):
    return functools.partial(LocalStore, store.root)


def sharded(store, out: Path, fmt: str, n: int = N_SHARDS, workers: int = 1, states=exports.DATASET_STATES,
            seen: list | None = None) -> dict:
    on_shard = (lambda record, written: seen.append((record.shard, written))) if seen is not None else None
    return shards.export_shards(factory(store), FolderTarget(out), ShardedExport.of(fmt, n, states), workers, on_shard)


def shard_paths(out: Path, fmt: str, n: int = N_SHARDS) -> list[Path]:
    return [out / ShardedExport(fmt, n).file_name(i) for i in range(n)]


def coco_by_item(doc: dict) -> dict[str, tuple]:
    """item id -> (image entry without its id, its annotations without ids, categories by name)."""
    names = {c["id"]: c["name"] for c in doc["categories"]}
    anns = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(
            {**{k: v for k, v in a.items() if k not in ("id", "image_id", "category_id")}, "category": names[a["category_id"]]})
    return {img["item_id"]: ({k: v for k, v in img.items() if k != "id"}, anns.get(img["id"], [])) for img in doc["images"]}


def saco_by_item(doc: dict) -> dict[str, list]:
    pairs = {}
    for record in doc["pairs"]:
        pairs.setdefault(record["image"]["item_id"], []).append(record)
    return pairs


def sa1b_tar_by_item(path: Path) -> dict[str, tuple[dict, bytes, str]]:
    """item id -> (document, image bytes, member stem) from one SA-1B tar; members come in pairs."""
    with tarfile.open(path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    docs = {name[:-5]: json.loads(data) for name, data in members.items() if name.endswith(".json")}
    images = {name.rsplit(".", 1)[0]: data for name, data in members.items() if not name.endswith(".json")}
    assert sorted(docs) == sorted(images) and len(members) == 2 * len(docs)
    return {doc["image"]["item_id"]: (doc, images[stem], stem) for stem, doc in docs.items()}


def test_shard_of_is_a_stable_hash_and_every_item_is_in_exactly_one_shard(store):
    import hashlib

    assert shard_of("abc", 7) == int(hashlib.sha256(b"abc").hexdigest()[:8], 16) % 7
    keys = list(exports.manifest_keys(store))
    for n in (1, 3, 7):
        per_shard = [list(exports.manifest_keys(store, Shard(i, n))) for i in range(n)]
        assert sorted(k for keys_ in per_shard for k in keys_) == sorted(keys)  # each key once
        assert all(keys_ == [k for k in keys if k in set(keys_)] for keys_ in per_shard)  # key order kept
    assert Counter(shard_of(k.split("/")[1], N_SHARDS) for k in keys).keys() == set(range(N_SHARDS))


@pytest.mark.parametrize("fmt", ["coco", "saco", "sa1b"])
def test_shards_equal_the_unsharded_export_item_for_item(store, tmp_path, fmt):
    whole = tmp_path / ("whole" if fmt == "sa1b" else "whole.json")
    summary = exports.export(store, fmt, whole, exports.DATASET_STATES)
    index = sharded(store, tmp_path / "shards", fmt)
    paths = shard_paths(tmp_path / "shards", fmt)
    if fmt == "coco":
        expected = coco_by_item(json.loads(whole.read_text()))
        parts = [coco_by_item(json.loads(p.read_text())) for p in paths]
    elif fmt == "saco":
        expected = saco_by_item(json.loads(whole.read_text()))
        parts = [saco_by_item(json.loads(p.read_text())) for p in paths]
    else:
        expected = {d["image"]["item_id"]: d for d in (json.loads(p.read_text()) for p in whole.iterdir())}
        tars = [sa1b_tar_by_item(p) for p in paths]
        for part in tars:
            for item_id, (doc, image, stem) in part.items():
                manifest = Item.from_json(json.loads(store.get(f"items/{item_id}/manifest.json")))
                assert image == store.get(manifest.image_key) and stem  # the image's own bytes
        parts = [{item_id: doc for item_id, (doc, _, _) in part.items()} for part in tars]
    assert sum(len(p) for p in parts) == len(expected)  # no item twice ...
    assert {k: v for p in parts for k, v in p.items()} == expected  # ... and each as the unsharded export has it
    for i, part in enumerate(parts):
        assert all(shard_of(item_id, N_SHARDS) == i for item_id in part)
    assert (index["items"], index["annotations"], index["skipped"]) == (summary.items, summary.annotations, summary.skipped)
    assert [f["file"] for f in index["files"]] == [p.name for p in paths]
    assert all(f["sha256"] == file_sha256(p) for f, p in zip(index["files"], paths))
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    assert (index["format"], index["shards"], index["states"]) == (fmt, N_SHARDS, ["ACCEPTED", "REJECTED", "REVIEW"])


def test_sa1b_shard_names_are_unique_with_their_images_extension(local_store, tmp_path):
    for source in ("a/photo.jpg", "b/photo.jpg", "c/PHOTO.png"):
        item = save(local_store, source)
        local_store.put(item.image_key, b"\xff\xd8\xff\xe0" if source.endswith("jpg") else b"unknown bytes")
    sharded(local_store, tmp_path / "out", "sa1b", n=1, states=None)
    with tarfile.open(tmp_path / "out" / "sa_000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 6 and len({n.lower() for n in names}) == 6
    assert sum(n.endswith(".jpg") for n in names) == 2 and sum(n.endswith(".png") for n in names) == 1  # magic, then name


def test_an_error_after_some_shards_resumes_without_redoing_them(store, tmp_path, monkeypatch):
    out, clean = tmp_path / "out", sharded(store, tmp_path / "clean", "coco")
    real_write = shards.write_shard

    def fail_at_shard_two(store_, export, index, fp, keys=None):
        if index == 2:
            fp.write(b'{"images":[')  # part of a file, as a crash would leave it
            raise RuntimeError("disk full")
        return real_write(store_, export, index, fp, keys)

    monkeypatch.setattr(shards, "write_shard", fail_at_shard_two)
    with pytest.raises(RuntimeError, match="disk full"):
        sharded(store, out, "coco")
    assert sorted(p.name for p in out.iterdir()) == [".shards", "coco_000000.json", "coco_000001.json"]  # no temp file
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("coco_*.json")}
    monkeypatch.setattr(shards, "write_shard", real_write)
    save(store, "late.jpg")  # after the export began: not in its plan, so not in its resumed shards
    seen = []
    assert sharded(store, out, "coco", seen=seen) == clean
    assert sorted(seen) == [(0, False), (1, False), (2, True), (3, True)]
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before  # finished shards untouched


def test_the_store_is_listed_once_for_all_shards(store, tmp_path, monkeypatch):
    listed = []
    real_list = LocalStore.list
    monkeypatch.setattr(LocalStore, "list", lambda self, prefix="": listed.append(prefix) or real_list(self, prefix))
    index = sharded(store, tmp_path / "out", "saco")
    assert listed == ["items/"] and index["items"] == exports.write_saco(store, io.StringIO(), exports.DATASET_STATES).items
    plan = json.loads((tmp_path / "out" / ".shards" / "plan" / "done.json").read_text())
    assert sum(plan["keys"]) == len(list(exports.manifest_keys(store))) and len(plan["keys"]) == N_SHARDS


def test_a_killed_export_process_resumes_without_duplicates(store, tmp_path):
    out = tmp_path / "out"
    # A store that answers slowly, so the kill lands while shard 1 is being written.
    script = f"""
import functools, time
from pathlib import Path
from services.common.storage import LocalStore
from services.orchestrator import exports, shards

class SlowStore(LocalStore):
    def get(self, key):
        time.sleep(0.2)
        return super().get(key)

shards.export_shards(functools.partial(SlowStore, {str(store.root)!r}), shards.FolderTarget(Path({str(out)!r})),
                     shards.ShardedExport.of("sa1b", {N_SHARDS}, exports.DATASET_STATES), workers=1)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(".sa_000001.tar.*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert (out / ".shards" / "000000.json").is_file() and list(out.glob(".sa_000001.tar.*.tmp"))
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "sa_000001.tar").exists() and not (out / "index.json").exists()
    first = (out / "sa_000000.tar").stat()
    seen = []
    index = sharded(store, out, "sa1b", seen=seen)
    assert (0, False) in seen and (1, True) in seen
    assert (out / "sa_000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert not list(out.glob(".*.tmp"))  # the killed run's temporary file is gone
    item_ids = [i for p in shard_paths(out, "sa1b") for i in sa1b_tar_by_item(p)]
    assert len(item_ids) == len(set(item_ids)) == index["items"] == exports.export(
        store, "sa1b", tmp_path / "whole", exports.DATASET_STATES).items


@pytest.mark.parametrize("damage", [
    lambda out: (out / "saco_000001.json").write_bytes((out / "saco_000001.json").read_bytes()[:-7]),  # cut short
    lambda out: (out / ".shards" / "000001.json").unlink(),                                         # no record
    lambda out: (out / "saco_000001.json").write_bytes(b"X" + (out / "saco_000001.json").read_bytes()[1:]),  # same size, other sha
    lambda out: (out / "saco_000001.json").unlink(),                                                # file gone
    lambda out: (out / ".shards" / "000001.json").write_text("{half a rec"),                        # torn record
])
def test_a_damaged_shard_is_redone_and_only_it(store, tmp_path, damage):
    out = tmp_path / "out"
    first = sharded(store, out, "saco")
    damage(out)
    seen = []
    assert sharded(store, out, "saco", seen=seen) == first
    assert sorted(seen) == [(0, False), (1, True), (2, False), (3, False)]


def test_a_folder_holding_another_export_is_refused(store, tmp_path):
    sharded(store, tmp_path / "out", "coco", n=2)
    with pytest.raises(InvalidInput, match="another sharded export"):
        sharded(store, tmp_path / "out", "coco", n=3)


def test_shards_into_the_store_under_exports_resume_and_are_never_read_as_manifests(store):
    target, export = StoreTarget("exports/run1/"), ShardedExport.of("coco", N_SHARDS, exports.DATASET_STATES)
    seen = []
    index = shards.export_shards(factory(store), target, export, on_shard=lambda r, w: seen.append(w))
    assert seen == [True] * N_SHARDS and json.loads(store.get("exports/run1/index.json")) == index
    docs = [json.loads(store.get(f"exports/run1/coco_{i:06d}.json")) for i in range(N_SHARDS)]
    assert sum(len(d["images"]) for d in docs) == index["items"] == exports.write_coco(
        store, io.StringIO(), exports.DATASET_STATES).items
    seen.clear()
    assert shards.export_shards(factory(store), target, export, on_shard=lambda r, w: seen.append(w)) == index
    assert seen == [False] * N_SHARDS
    with pytest.raises(InvalidInput, match="manifests"):
        StoreTarget("items/x")


@pytest.mark.parametrize("fmt, args, code, message", [
    ("coco", ["--shards", "0"], 2, "--shards must be at least 1, got 0"),
    ("coco", ["--shards", "2", "--workers", "0"], 2, "--workers must be at least 1, got 0"),
    ("coco", ["--workers", "2"], 2, "give --shards N"),                       # nothing to split
    ("coco", ["--shards", "2", "--queue"], 2, "--to-store"),                 # the workers write into the store
    ("coco", ["--shards", "2", "--to-store", "exports/x"], 2, "one destination"),  # and --out
    ("voc", ["--shards", "2"], 1, "unknown export format 'voc'"),
    ("sa1b", ["--shards", "2", "--state", "done"], 1, "unknown item state 'done'"),
])
def test_cli_bad_input_names_the_problem(store, tmp_path, monkeypatch, fmt, args, code, message):
    _cli_env(monkeypatch, store)
    result = CliRunner().invoke(cli_app, ["export", fmt, "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


def test_cli_shards_in_worker_processes_then_resumes(store, tmp_path, monkeypatch):
    _cli_env(monkeypatch, store)
    out = tmp_path / "out"
    args = ["export", "sa1b", "--out", str(out), "--shards", "3", "--workers", "2"]
    first = CliRunner().invoke(cli_app, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert (report["shards"], report["written"], report["kept"], report["index"]) == (3, 3, 0, str(out / "index.json"))
    # byte for byte (sha256) what one process writes, whichever worker wrote a shard
    assert json.loads((out / "index.json").read_text())["files"] == sharded(store, tmp_path / "one", "sa1b", 3)["files"]
    again = json.loads(CliRunner().invoke(cli_app, args).stdout.strip().splitlines()[-1])
    assert (again["written"], again["kept"], again["items"]) == (0, 3, report["items"])


def _cli_env(monkeypatch, store) -> None:
    monkeypatch.setenv("DATAENGINE_STORE", "local")
    monkeypatch.setenv("DATAENGINE_STORE_ROOT", str(store.root.parent))
    monkeypatch.setenv("DATAENGINE_BUCKET", store.root.name)


@pytest.mark.slow
def test_celery_export_shard_tasks_on_a_worker_process(broker, s3_endpoint, minio_store, tmp_path, monkeypatch):
    from services.common.queues import create_celery
    from services.orchestrator.export_tasks import EXPORT_SHARD_TASK, export_shards_queued
    from tests.conftest import S3_KEY, S3_SECRET
    from tests.servers import celery_worker

    build(minio_store)
    env = {**os.environ, "DATAENGINE_STORE": "minio", "DATAENGINE_MINIO_ENDPOINT": s3_endpoint,
           "DATAENGINE_MINIO_ACCESS_KEY": S3_KEY, "DATAENGINE_MINIO_SECRET_KEY": S3_SECRET,
           "DATAENGINE_BUCKET": minio_store.bucket, "DATAENGINE_BROKER_URL": broker}
    target, export = StoreTarget("exports/run1"), ShardedExport.of("sa1b", N_SHARDS, exports.DATASET_STATES)
    shards.export_shards(lambda: minio_store, StoreTarget("exports/here"), export)  # the same export, in this process
    target.begin(minio_store, export)
    done_first, _ = shards.run_shard(minio_store, target, export, 0)  # finished before the queue run: kept
    app = create_celery(Settings(broker_url=broker))
    seen, sent = [], []
    with celery_worker("orchestrator", env, tmp_path / "worker.log"):
        index = export_shards_queued(app, minio_store, target, export, lambda r, w: seen.append((r.shard, w)),
                                     poll_s=0.1, on_sent=sent.append)
        again = app.send_task(EXPORT_SHARD_TASK, args=[export.to_json(), "exports/run1", 0]).get(timeout=60)
        bad = app.send_task(EXPORT_SHARD_TASK, args=[export.to_json(), "items/x", 0]).get(timeout=60)
        for name, value in env.items():  # the command reads the same settings as the worker
            if name.startswith("DATAENGINE_"):
                monkeypatch.setenv(name, value)
        command = CliRunner().invoke(cli_app, ["export", "sa1b", "--to-store", "exports/cli", "--shards", "3", "--queue"])
    assert sent == [N_SHARDS - 1] and sorted(seen) == [(0, False)] + [(i, True) for i in range(1, N_SHARDS)]
    assert index["files"][0] == done_first.index_entry() and again["ok"] and not again["outputs"]["written"]
    assert not bad["ok"] and bad["code"] == "INVALID_ARGUMENT" and "manifests" in bad["reason"]
    here = json.loads(minio_store.get("exports/here/index.json"))
    assert index["files"] == here["files"]  # the worker wrote the same bytes
    assert json.loads(minio_store.get("exports/run1/index.json")) == index
    assert command.exit_code == 0, command.output
    report = json.loads(command.stdout.strip().splitlines()[-1])
    assert (report["written"], report["items"], report["index"]) == (3, index["items"], "exports/cli/index.json")
    assert json.loads(minio_store.get("exports/cli/index.json"))["annotations"] == index["annotations"]
