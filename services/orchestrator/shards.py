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
    index.json            once every shard is done: each shard's file, counts and sha256, and totals

A shard counts as done when its record matches this export and its file exists with the recorded
size and sha256 (in a folder; a store takes whole objects, so there the object's presence is
enough). Anything else (no record, a torn or foreign file) is written again from scratch; items are
never appended to a shard, so a redone shard holds each of its items once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterable, Iterator

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.read_ahead import read_ahead
from services.common.storage import ObjectStore
from services.orchestrator import exports
from services.orchestrator.exports import ExportSummary, Shard
from services.orchestrator.model import ItemState

PROGRESS = ".shards"
INDEX = "index.json"
_FILES = {"sa1b": "sa_{:06d}.tar", "coco": "coco_{:06d}.json", "saco": "saco_{:06d}.json"}
_CONTENT_TYPES = {"sa1b": "application/x-tar", "coco": "application/json", "saco": "application/json"}
_HASH_CHUNK = 1 << 20

StoreFactory = Callable[[], ObjectStore]  # picklable (a function or functools.partial) for worker processes
OnShard = Callable[["ShardRecord", bool], None]  # (record, written now rather than found done)


@dataclass(frozen=True)
class ShardedExport:
    """One sharded export: format, shard count and the item states it holds (None: every item).

    Validated on creation (``InvalidInput`` naming the problem); JSON-able for task messages."""

    fmt: str
    shards: int
    states: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", exports.check_format(self.fmt))
        Shard(0, self.shards)  # the count's checks
        if self.states is not None:
            names = sorted({ItemState.parse(s).name for s in self.states})
            object.__setattr__(self, "states", tuple(names))

    @classmethod
    def of(cls, fmt: str, shards: int, states: Collection[ItemState] | None) -> "ShardedExport":
        return cls(fmt, shards, None if states is None else tuple(s.name for s in states))

    @property
    def item_states(self) -> frozenset[ItemState] | None:
        return None if self.states is None else frozenset(ItemState[s] for s in self.states)

    def file_name(self, index: int) -> str:
        return _FILES[self.fmt].format(index)

    def to_json(self) -> dict:
        return {"format": self.fmt, "shards": self.shards, "states": None if self.states is None else list(self.states)}

    @classmethod
    def from_json(cls, d: dict) -> "ShardedExport":
        try:
            return cls(d["format"], d["shards"], None if d.get("states") is None else tuple(d["states"]))
        except (KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"not a sharded export description: {d!r:.200} ({exc})") from None


@dataclass(frozen=True)
class ShardRecord:
    """Progress record of a finished shard: the export it belongs to, its file name, size in bytes,
    sha256 (hex) and counts."""

    export: ShardedExport
    shard: int
    file: str
    bytes: int
    sha256: str
    summary: ExportSummary

    def to_json(self) -> dict:
        return {"export": self.export.to_json(), "shard": self.shard, "file": self.file, "bytes": self.bytes,
                "sha256": self.sha256, "summary": self.summary.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "ShardRecord":
        return cls(ShardedExport.from_json(d["export"]), int(d["shard"]), str(d["file"]), int(d["bytes"]),
                   str(d["sha256"]), ExportSummary(**d["summary"]))

    def index_entry(self) -> dict:
        return {"shard": self.shard, "file": self.file, **self.summary.to_json(), "bytes": self.bytes,
                "sha256": self.sha256}


def _parse_record(data: bytes, export: ShardedExport, index: int) -> ShardRecord | None:
    """The record if it is one of this export's shard ``index``, else None (unreadable, foreign)."""
    try:
        record = ShardRecord.from_json(json.loads(data))
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return record if (record.export, record.shard, record.file) == (export, index, export.file_name(index)) else None


class _Digest(io.RawIOBase):
    """A write-only file that passes bytes on to ``raw`` and keeps their sha256 and count."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)


_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tif"), (b"MM\x00*", "tif"))
_SUFFIX = re.compile(r"^[a-z0-9]{1,8}$")


def image_suffix(data: bytes, source: str) -> str:
    """The image file's extension, no dot: from its first bytes, else its source name's, else "bin"."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = os.path.splitext(source.replace("\\", "/").rsplit("/", 1)[-1])[1][1:].lower()
    return suffix if _SUFFIX.match(suffix) and suffix != "json" else "bin"  # json: the document's name


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: a redone shard is byte-identical
    tar.addfile(info, io.BytesIO(data))


def write_shard(store: ObjectStore, export: ShardedExport, index: int, fp: BinaryIO) -> ExportSummary:
    """Shard ``index`` of ``export`` into the binary file ``fp``: a tar for sa1b, else JSON."""
    shard, states = Shard(index, export.shards), export.item_states
    if export.fmt == "sa1b":
        summary = ExportSummary()
        with tarfile.open(fileobj=fp, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # a stream: no seeks
            for name, doc, item, image in exports.sa1b_documents(store, states, summary, shard, images=True):
                _add(tar, f"{name}.{image_suffix(image, item.source)}", image)
                _add(tar, f"{name}.json", doc)
        return summary
    text = io.TextIOWrapper(fp, encoding="utf-8")
    summary = exports.FILE_WRITERS[export.fmt](store, text, states, shard)
    text.flush()
    text.detach()  # leave ``fp`` open for the caller
    return summary


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, _HASH_CHUNK), b""):
            sha.update(block)
    return sha.hexdigest()


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
        stem = _FILES[export.fmt].split("_")[0]
        for stale in [*Path(self.out).glob(f".{stem}_*.tmp"), *Path(self.out).glob(f".{INDEX}.*.tmp"),
                      *progress.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)

    def finished(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord | None:
        try:
            record = _parse_record((Path(self.out) / PROGRESS / f"{index:06d}.json").read_bytes(), export, index)
            path = Path(self.out) / export.file_name(index)
            if record is None or path.stat().st_size != record.bytes or _file_sha256(path) != record.sha256:
                return None
        except FileNotFoundError:
            return None
        return record

    def write(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord:
        path = Path(self.out) / export.file_name(index)
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as raw:
                digest = _Digest(raw)
                summary = write_shard(store, export, index, digest)
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

    def finished(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord | None:
        try:
            record = _parse_record(store.get(self.record_key(index)), export, index)
        except KeyError:  # NotFound
            return None
        return record if record is not None and store.exists(self.key(record.file)) else None

    def write(self, store: ObjectStore, export: ShardedExport, index: int) -> ShardRecord:
        # The store takes whole objects: the shard is built in a local temporary file, then put
        # (so a shard must fit in the worker's memory once: size N accordingly).
        with tempfile.TemporaryFile() as raw:
            digest = _Digest(raw)
            summary = write_shard(store, export, index, digest)
            raw.seek(0)
            store.put(self.key(export.file_name(index)), raw.read(), content_type=_CONTENT_TYPES[export.fmt])
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
    with ProcessPoolExecutor(min(workers, len(indices)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_write_in_worker, store_factory, target, export, i) for i in indices]
        error: BaseException | None = None
        for future in as_completed(futures):
            if future.cancelled():
                continue
            try:
                yield future.result()
            except BrokenProcessPool:
                error = error or FailedPrecondition("a shard worker process died (killed, or out of memory); "
                                                    "run the export again: finished shards are kept")
            except Exception as exc:  # noqa: BLE001 - raised below, once the running shards are done
                error = error or exc
            if error is not None:
                for pending in futures:
                    pending.cancel()
        if error is not None:
            raise error


def export_shards(store_factory: StoreFactory, target: Target, export: ShardedExport, workers: int = 1,
                  on_shard: OnShard | None = None) -> dict:
    """Write every unfinished shard of ``export`` to ``target`` with ``workers`` processes, then
    the index; returns the index (see the module's docstring).

    Finished shards are checked here first (``workers`` threads: hashing and reading release the
    GIL), so a resumed export starts processes only for what is left. ``on_shard`` is called in
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
    for record in _write_all(store, store_factory, target, export, todo, workers):
        records[record.shard] = record
        if on_shard is not None:
            on_shard(record, True)
    return target.write_index(store, export, [records[i] for i in range(export.shards)])


def merged(records: Iterable[ShardRecord]) -> ExportSummary:
    """The counts of several shards together."""
    totals = ExportSummary()
    for record in records:
        for field, value in record.summary.to_json().items():
            setattr(totals, field, getattr(totals, field) + value)
    return totals
