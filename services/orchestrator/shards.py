"""Sharded exports: N shards by item-id hash (``exports.shard_of``), each written atomically and
recorded, so an export resumes where it stopped; shards run in worker processes or Celery tasks.

Layout, in a folder (``FolderTarget``) or under a prefix below ``exports/`` in the object store
(``StoreTarget``)::

    sa_000000.tar ...     sa1b: per image <name>.<ext> (its bytes from the store) and <name>.json
                          (the SA-1B document), as SA-1B ships them; names unique within the shard
    coco_000000.json ...  coco / saco: the unsharded writer's document for the shard's items
                          (COCO image, annotation and category ids count within the shard)
    .shards/export.json   which export this is (format, states, shard count): another one is refused
    .shards/000000.json   progress record of a finished shard: file, bytes, sha256 and counts,
                          written after the shard's file is in place
    .shards/plan/         each shard's manifest keys (000000.keys, one a line, in key order) and
                          done.json: one listing of the store for all shards, not one per shard
    index.json            once every shard is done: each shard's file, counts and sha256, and totals

A shard counts as done when its record matches this export and its file exists with the recorded
size and sha256 (in a folder; a store takes whole objects, so there the object's presence is
enough). Anything else (no record, a torn or foreign file) is written again from scratch; items are
never appended to a shard, so a redone shard holds each of its items once. The plan is made once
per export: a resumed or redone shard exports the items listed when the export began (their
manifests as they are now), so every shard comes from the same listing.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.read_ahead import read_ahead
from services.common.storage import ObjectStore
from services.orchestrator import exports
from services.orchestrator.exports import shard_of
from services.orchestrator.shard_files import (CONTENT_TYPES, FILES, Digest, ShardedExport, ShardRecord,
                                               file_sha256, merged, parse_record, write_shard)

__all__ = ["FolderTarget", "StoreTarget", "ShardedExport", "ShardRecord", "export_shards", "run_shard", "INDEX"]

PROGRESS = ".shards"
PLAN = f"{PROGRESS}/plan"
INDEX = "index.json"
_PLAN_FLUSH = 100_000  # keys held (all shards together) while planning before they go to the key files

StoreFactory = Callable[[], ObjectStore]  # picklable (a function or functools.partial) for worker processes
OnShard = Callable[[ShardRecord, bool], None]  # (record, written now rather than found done)


def _spool_plan(store: ObjectStore, export: ShardedExport, folder: Path) -> list[int]:
    """Every manifest key into ``folder/NNNNNN.keys`` of its shard, in key order, in one pass over
    the listing, holding at most ``_PLAN_FLUSH`` keys; returns the key count of each shard."""
    buffers: list[list[str]] = [[] for _ in range(export.shards)]
    counts, held = [0] * export.shards, 0

    def flush() -> None:
        for index, keys in enumerate(buffers):
            with open(folder / f"{index:06d}.keys", "a", encoding="utf-8") as f:  # created even if empty
                f.write("".join(f"{key}\n" for key in keys))
            keys.clear()

    for key in exports.manifest_keys(store):
        index = shard_of(key.split("/")[1], export.shards)  # items/<id>/manifest.json
        buffers[index].append(key)
        counts[index] += 1
        held += 1
        if held >= _PLAN_FLUSH:
            flush()
            held = 0
    flush()
    return counts


def _plan_marker(export: ShardedExport, counts: list[int]) -> bytes:
    return json.dumps({"export": export.to_json(), "keys": counts}).encode()


def _is_plan_of(data: bytes, export: ShardedExport) -> bool:
    try:
        return json.loads(data).get("export") == export.to_json()
    except (ValueError, AttributeError):
        return False


def _read_keys(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (temporary name, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _claim_message(where: str, found: dict, export: ShardedExport) -> str:
    return (f"{where} holds another sharded export ({json.dumps(found)}), not this one "
            f"({json.dumps(export.to_json())}): choose another destination or remove it")


def _index(export: ShardedExport, records: list[ShardRecord]) -> dict:
    return {**export.to_json(), **merged(records).to_json(), "files": [r.index_entry() for r in records]}


@dataclass(frozen=True)
class FolderTarget:
    """Shards as files in a local folder ``out``."""

    out: Path

    def begin(self, store: ObjectStore, export: ShardedExport) -> None:
        """Create the folder, claim it for ``export`` (refusing one that holds another export) and
        remove temporary files a killed run left."""
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise InvalidInput(f"{self.out} is a file: a sharded export writes a folder (shards and {INDEX})")
        progress = Path(self.out) / PROGRESS
        progress.mkdir(parents=True, exist_ok=True)
        claim = progress / "export.json"
        if claim.is_file():
            found = json.loads(claim.read_bytes())
            if found != export.to_json():
                raise InvalidInput(_claim_message(str(self.out), found, export))
        else:
            _replace_file(claim, json.dumps(export.to_json()).encode())
        stem = FILES[export.fmt].split("_")[0]
        for stale in [*Path(self.out).glob(f".{stem}_*.tmp"), *Path(self.out).glob(f".{INDEX}.*.tmp"),
                      *progress.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)

    def plan(self, store: ObjectStore, export: ShardedExport) -> None:
        """List the store once into every shard's key file, unless this export's plan is there."""
        folder = Path(self.out) / PLAN
        marker = folder / "done.json"
        if marker.is_file() and _is_plan_of(marker.read_bytes(), export):
            return
        shutil.rmtree(folder, ignore_errors=True)  # a killed run's partial plan
        folder.mkdir(parents=True)
        _replace_file(marker, _plan_marker(export, _spool_plan(store, export, folder)))

    def shard_keys(self, store: ObjectStore, export: ShardedExport, index: int) -> Callable[[], Iterable[str]] | None:
        marker = Path(self.out) / PLAN / "done.json"
        if not (marker.is_file() and _is_plan_of(marker.read_bytes(), export)):
            return None
        return functools.partial(_read_keys, Path(self.out) / PLAN / f"{index:06d}.keys")

    def finished(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord | None:
        try:
            record = parse_record((Path(self.out) / PROGRESS / f"{index:06d}.json").read_bytes(), export, index)
            path = Path(self.out) / export.file_name(index)
            if record is None or path.stat().st_size != record.bytes or file_sha256(path) != record.sha256:
                return None
        except FileNotFoundError:
            return None
        return record

    def write(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord:
        path = Path(self.out) / export.file_name(index)
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw:
                digest = Digest(raw)
                summary = write_shard(store, export, index, digest, self.shard_keys(store, export, index))
                raw.flush()
                os.fsync(raw.fileno())  # the record below must never describe bytes still in flight
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        record = ShardRecord(export, index, path.name, digest.size, digest.sha.hexdigest(), summary)
        _replace_file(Path(self.out) / PROGRESS / f"{index:06d}.json", json.dumps(record.to_json()).encode())
        return record

    def write_index(self, store: ObjectStore, export: ShardedExport, records: list[ShardRecord]) -> dict:
        index = _index(export, records)
        _replace_file(Path(self.out) / INDEX, json.dumps(index, indent=1).encode())
        return index


@dataclass(frozen=True)
class StoreTarget:
    """Shards as objects under ``prefix`` (below ``exports/``) in the store being exported."""

    prefix: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", exports.check_prefix(self.prefix))

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def record_key(self, index: int) -> str:
        return self.key(f"{PROGRESS}/{index:06d}.json")

    def begin(self, store: ObjectStore, export: ShardedExport) -> None:
        claim = self.key(f"{PROGRESS}/export.json")
        try:
            found = json.loads(store.get(claim))
        except KeyError:  # NotFound: a new export
            store.put(claim, json.dumps(export.to_json()).encode(), content_type="application/json")
            return
        if found != export.to_json():
            raise InvalidInput(_claim_message(self.prefix, found, export))

    def plan(self, store: ObjectStore, export: ShardedExport) -> None:
        """List the store once into every shard's key object, unless this export's plan is there."""
        try:
            if _is_plan_of(store.get(self.key(f"{PLAN}/done.json")), export):
                return
        except KeyError:  # NotFound
            pass
        with tempfile.TemporaryDirectory(prefix="export-plan-") as spool:
            counts = _spool_plan(store, export, Path(spool))
            for index in range(export.shards):
                store.put(self.key(f"{PLAN}/{index:06d}.keys"), (Path(spool) / f"{index:06d}.keys").read_bytes(),
                          content_type="text/plain")
        store.put(self.key(f"{PLAN}/done.json"), _plan_marker(export, counts), content_type="application/json")

    def shard_keys(self, store: ObjectStore, export: ShardedExport, index: int) -> Callable[[], Iterable[str]] | None:
        try:
            if not _is_plan_of(store.get(self.key(f"{PLAN}/done.json")), export):
                return None
        except KeyError:  # NotFound: no plan, the shard lists the store itself
            return None
        return lambda: store.get(self.key(f"{PLAN}/{index:06d}.keys")).decode("utf-8").splitlines()

    def finished(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord | None:
        try:
            record = parse_record(store.get(self.record_key(index)), export, index)
        except KeyError:  # NotFound
            return None
        return record if record is not None and store.exists(self.key(record.file)) else None

    def write(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord:
        # The store takes whole objects: the shard is built in a local temporary file, then put
        # (so a shard must fit in the worker's memory once: size N accordingly).
        with tempfile.TemporaryFile() as raw:
            digest = Digest(raw)
            summary = write_shard(store, export, index, digest, self.shard_keys(store, export, index))
            raw.seek(0)
            store.put(self.key(export.file_name(index)), raw.read(), content_type=CONTENT_TYPES[export.fmt])
        record = ShardRecord(export, index, export.file_name(index), digest.size, digest.sha.hexdigest(), summary)
        store.put(self.record_key(index), json.dumps(record.to_json()).encode(), content_type="application/json")
        return record

    def write_index(self, store: ObjectStore, export: ShardedExport, records: list[ShardRecord]) -> dict:
        index = _index(export, records)
        store.put(self.key(INDEX), json.dumps(index, indent=1).encode(), content_type="application/json")
        return index


Target = FolderTarget | StoreTarget


def run_shard(store: ObjectStore, target: Target, export: ShardedExport, index: int) -> tuple[ShardRecord, bool]:
    """Shard ``index``: (its record, True) after writing it, or (the record, False) if it was done."""
    record = target.finished(store, export, index)
    return (record, False) if record is not None else (target.write(store, export, index), True)


def _write_in_worker(store_factory: StoreFactory, target: Target, export: ShardedExport, index: int) -> ShardRecord:
    return target.write(store_factory(), export, index)


def _write_all(store: ObjectStore, store_factory: StoreFactory, target: Target, export: ShardedExport,
               indices: list[int], workers: int) -> Iterator[ShardRecord]:
    """Write the shards ``indices`` through ``workers`` processes (1: this one), yielding each
    record as it is done. After a failure nothing new starts; the shards running finish (and stay
    done) before it is raised."""
    if workers <= 1 or len(indices) <= 1:
        for index in indices:
            yield target.write(store, export, index)
        return
    # spawn: a fork of this process (threads of a progress bar, a read-ahead pool) could deadlock
    pool = ProcessPoolExecutor(min(workers, len(indices)), mp_context=multiprocessing.get_context("spawn"))
    try:
        for future in as_completed([pool.submit(_write_in_worker, store_factory, target, export, i) for i in indices]):
            try:
                record = future.result()
            except BrokenProcessPool:
                raise FailedPrecondition("a shard worker process died (killed, or out of memory); run the "
                                         "export again: finished shards are kept") from None
            yield record
    finally:  # a failure or an interrupt: start no other shard, let the running ones finish (they stay done)
        pool.shutdown(wait=True, cancel_futures=True)


def export_shards(store_factory: StoreFactory, target: Target, export: ShardedExport, workers: int = 1,
                  on_shard: OnShard | None = None) -> dict:
    """Write every unfinished shard of ``export`` to ``target`` with ``workers`` processes, then
    the index; returns the index (see the module's docstring).

    Finished shards are checked here first (``workers`` threads: hashing and reading release the
    GIL), so a resumed export starts processes only for what is left; then the store is listed
    once into the plan (kept from an earlier run of this export). ``on_shard`` is called in
    this process as each shard is found done or written. Raises ``InvalidInput`` for bad arguments
    or a destination holding another export; a failed shard's error once the others stopped."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidInput(f"worker count must be a whole number of at least 1, got {workers!r}")
    store = store_factory()
    target.begin(store, export)
    records: dict[int, ShardRecord] = {}
    checks = read_ahead(range(export.shards), lambda i: target.finished(store, export, i), workers)
    for index, record in enumerate(checks):
        if record is not None:
            records[index] = record
            if on_shard is not None:
                on_shard(record, False)
    todo = [i for i in range(export.shards) if i not in records]
    if todo and export.shards > 1:
        target.plan(store, export)  # one listing for every shard, not one each
    for record in _write_all(store, store_factory, target, export, todo, workers):
        records[record.shard] = record
        if on_shard is not None:
            on_shard(record, True)
    return target.write_index(store, export, [records[i] for i in range(export.shards)])
