"""The files of a sharded export: what the export is (``ShardedExport``), a finished shard's
progress record (``ShardRecord``) and the bytes of one shard (``write_shard``): an SA-1B tar of
image + JSON pairs, or the COCO / SA-Co document of the shard's items."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Collection, Iterable

from services.common.errors import InvalidInput
from services.common.storage import ObjectStore
from services.orchestrator import exports
from services.orchestrator.exports import ExportSummary, Shard
from services.orchestrator.model import ItemState

FILES = {"sa1b": "sa_{:06d}.tar", "coco": "coco_{:06d}.json", "saco": "saco_{:06d}.json"}
CONTENT_TYPES = {"sa1b": "application/x-tar", "coco": "application/json", "saco": "application/json"}
_HASH_CHUNK = 1 << 20


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
        return FILES[self.fmt].format(index)

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


def parse_record(data: bytes, export: ShardedExport, index: int) -> ShardRecord | None:
    """The record if it is one of this export's shard ``index``, else None (unreadable, foreign)."""
    try:
        record = ShardRecord.from_json(json.loads(data))
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return record if (record.export, record.shard, record.file) == (export, index, export.file_name(index)) else None


class Digest(io.RawIOBase):
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


def write_shard(store: ObjectStore, export: ShardedExport, index: int, fp: BinaryIO,
                keys: Callable[[], Iterable[str]] | None = None) -> ExportSummary:
    """Shard ``index`` of ``export`` into the binary file ``fp``: a tar for sa1b, else JSON.
    keys: the shard's manifest keys from a plan (None: from the store's listing)."""
    shard, states = Shard(index, export.shards, keys), export.item_states
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


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, _HASH_CHUNK), b""):
            sha.update(block)
    return sha.hexdigest()


def merged(records: Iterable[ShardRecord]) -> ExportSummary:
    """The counts of several shards together."""
    totals = ExportSummary()
    for record in records:
        for field, value in record.summary.to_json().items():
            setattr(totals, field, getattr(totals, field) + value)
    return totals
