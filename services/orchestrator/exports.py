"""Dataset exports from item manifests: COCO instances, per-image SA-1B and SA-Co style JSON.

Everything streams: manifest keys come from the store's listing in its (sorted) key order, never
collected; manifests are read ahead on a few threads (``READ_AHEAD`` in flight, results in key
order) and JSON is written incrementally, so memory holds a window of items plus small string sets
(phrase texts, file names), never the dataset. Only ``items/<id>/manifest.json`` keys are read, and
exports may not be written under ``items/`` so an export can never be mistaken for a manifest.

Sharding (``Shard``): an item belongs to shard ``shard_of(item_id, count)``, a stable hash of the id
in its manifest key, so a shard's writer needs no global listing or count: it streams the listing
(or its shard's keys from a plan, ``shards.py``), reads only its own manifests and writes them in
key order. ``shards.py`` writes whole sharded exports.

Formats (ARCHITECTURE.md "Outputs"):
- COCO: ``{"images", "annotations", "categories", "info"}``. Categories are the positive noun
  phrases, ids 1.. by sorted phrase text; one annotation per phrase mask: compressed RLE (``counts``
  a str), bbox XYWH pixels, area pixels, iscrowd 0, score = the phrase's verifier score in [0, 1].
- SA-1B: one ``{"image", "annotations"}`` document per image: its class-agnostic grid masks.
- SA-Co: ``{"pairs": [...], "info"}``, one record per image–noun-phrase pair.

``states`` everywhere: the item states to export; None exports every item (callers decide, e.g.
``{ACCEPTED}`` for a clean dataset or ``SETTLED`` for everything a run finished).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Collection, Iterable, Iterator, TextIO

from pycocotools import mask as mask_utils

from services.common.errors import InvalidInput
from services.common.masks import sa1b_document
from services.common.read_ahead import read_ahead
from services.common.storage import ObjectStore, check_key
from services.orchestrator.model import Item, ItemState, PhraseResult

log = logging.getLogger(__name__)

FORMATS = ("coco", "sa1b", "saco")
_MANIFEST = re.compile(r"^items/([A-Za-z0-9._-]+)/manifest\.json$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_COMPACT = {"separators": (",", ":")}
IMAGE_LEVEL_NOTE = ("Phrases without masks are image-level labels: each image lists them in "
                    "image_level_labels (they are categories too) but they have no annotations. "
                    "Hard negatives proposed for the image are listed in negative_phrases (the SA-Co export "
                    "carries the verifier's state of each).")

States = Collection[ItemState] | None
# What a dataset export holds by default: everything the machine finished. Failed items have no
# size or masks, and discarded ones a human threw away; both stay visible through the API.
DATASET_STATES = frozenset({ItemState.ACCEPTED, ItemState.REVIEW, ItemState.REJECTED})
# Reads in flight per export stream: enough to hide an object store's latency; the MinIO client's
# connection pool holds 10, and more threads than connections only queue on it.
READ_AHEAD = 10


def shard_of(item_id: str, count: int) -> int:
    """The shard in [0, count) of an item: the first 32 bits of sha256(item id) modulo ``count``.
    Stable across processes and machines (unlike ``hash``), and uniform for any id."""
    return int(hashlib.sha256(item_id.encode("utf-8", "surrogateescape")).hexdigest()[:8], 16) % count


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the items ``shard_of`` puts there. Raises ``InvalidInput``.

    keys: its manifest keys in key order, listed once for every shard (a plan); None: the store's
    listing, filtered."""

    index: int
    count: int
    keys: Callable[[], Iterable[str]] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise InvalidInput(f"shard count must be a whole number of at least 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise InvalidInput(f"shard index must be in [0, {self.count}), got {self.index!r}")

    def holds(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index


@dataclass
class ExportSummary:
    """Counts of one export.

    items: manifests exported. images: images written (COCO image entries, SA-1B files, images with
    at least one SA-Co pair). annotations: masks written. phrases: image–noun-phrase pairs seen,
    negatives and image-level labels included. skipped: manifests (or SA-1B grid documents) that
    could not be read.
    """

    items: int = 0
    images: int = 0
    annotations: int = 0
    phrases: int = 0
    skipped: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def manifest_keys(store: ObjectStore, shard: Shard | None = None) -> Iterator[str]:
    """``items/<id>/manifest.json`` keys in the store's listing order (sorted: deterministic for
    the same store), streamed; with ``shard``, only the keys whose item id it holds."""
    for key in store.list("items/") if shard is None or shard.keys is None else shard.keys():
        match = _MANIFEST.match(key)
        if match and (shard is None or shard.holds(match.group(1))):
            yield key


def _read_manifest(store: ObjectStore, key: str) -> tuple[str, Item | Exception]:
    """(key, item) or (key, why it is unreadable); storage trouble raises."""
    try:
        return key, Item.from_json(json.loads(store.get(key)))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:  # NotFound is a KeyError
        return key, exc


def iter_items(store: ObjectStore, states: States = None, summary: ExportSummary | None = None,
               shard: Shard | None = None, window: int = READ_AHEAD) -> Iterator[Item]:
    """Items in manifest-key order (``manifest_keys``), read ``window`` at a time on threads.

    A manifest that is gone, not JSON or not an item is skipped with a warning and counted in
    ``summary.skipped``. Storage trouble (``TransientError``) propagates: skipping it would drop
    data silently from an export that looks complete.
    """
    for key, item in read_ahead(manifest_keys(store, shard), lambda k: _read_manifest(store, k), window):
        if isinstance(item, Exception):
            log.warning("export skips unreadable manifest %s: %s", key, item)
            if summary is not None:
                summary.skipped += 1
        elif states is None or item.state in states:
            yield item


def _annotated(p: PhraseResult) -> bool:
    """Whether a phrase contributes mask annotations (hard negatives and image-level labels don't)."""
    return not p.is_negative and p.grounded and bool(p.masks)


def _image_size(item: Item) -> tuple[int, int]:
    """(H, W) pixels: the manifest's, else the first mask's RLE size (a reviewed item may lack it)."""
    if item.height and item.width:
        return item.height, item.width
    for mask in (m for p in item.phrases for m in p.masks):
        return int(mask.segmentation["size"][0]), int(mask.segmentation["size"][1])
    return item.height, item.width


def _compressed_rle(seg: dict) -> dict:
    """COCO RLE with ``counts`` as a compressed str: what pycocotools and the COCO spec expect for
    iscrowd 0 RLE (a review tool may have sent uncompressed counts)."""
    counts = seg["counts"]
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects(seg, *seg["size"])["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(seg["size"][0]), int(seg["size"][1])], "counts": counts}


def write_coco(store: ObjectStore, fp: TextIO, states: States = None, shard: Shard | None = None) -> ExportSummary:
    """COCO instances JSON into the text file ``fp``, in one pass over the manifests (of ``shard``
    only, when given: image, annotation and category ids then count within the shard).

    Category ids follow sorted phrase text, known only at the end, so annotations are spooled to a
    temporary file (one JSON line each, naming their phrase) and given their category id while
    copied into ``fp``. One pass, not two, so an item the engine changes mid-export is seen once.
    """
    summary, phrases = ExportSummary(), set()
    image_level = negatives = 0
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spool:
        fp.write('{"images":[')
        for item in iter_items(store, states, summary, shard):
            summary.items += 1
            summary.images += 1
            summary.phrases += len(item.phrases)
            height, width = _image_size(item)
            labels = sorted({p.phrase for p in item.phrases if not p.is_negative and not _annotated(p)})
            absent = sorted({p.phrase for p in item.phrases if p.is_negative})
            image_level, negatives = image_level + len(labels), negatives + len(absent)
            image = {"id": summary.images, "file_name": item.source, "height": height, "width": width,
                     "item_id": item.item_id, "image_level_labels": labels, "negative_phrases": absent}
            fp.write(("," if summary.images > 1 else "") + json.dumps(image, **_COMPACT))
            for p in item.phrases:
                if p.is_negative:
                    continue
                phrases.add(p.phrase)
                for mask in p.masks if _annotated(p) else ():
                    summary.annotations += 1  # ids from 1: COCOeval reads a matched id 0 as "no match"
                    ann = {"id": summary.annotations, "image_id": summary.images, "phrase": p.phrase,
                           "segmentation": _compressed_rle(mask.segmentation),
                           "bbox": [float(v) for v in mask.bbox], "area": int(mask.area), "iscrowd": 0,
                           "score": float(p.score)}
                    if mask.source:  # who made it: "sam1:MODEL_ID", "sam3:DIR", "human:PRINCIPAL"
                        ann["source"] = mask.source
                    spool.write(json.dumps(ann, **_COMPACT) + "\n")
        category_ids = {phrase: i for i, phrase in enumerate(sorted(phrases), start=1)}
        fp.write('],"annotations":[')
        spool.seek(0)
        for n, line in enumerate(spool):
            ann = json.loads(line)
            ann["category_id"] = category_ids[ann.pop("phrase")]
            fp.write(("," if n else "") + json.dumps(ann, **_COMPACT))
    categories = [{"id": i, "name": phrase, "supercategory": ""} for phrase, i in category_ids.items()]
    info = {"description": "dataengine export: COCO instances; categories are noun phrases",
            "note": IMAGE_LEVEL_NOTE, "images": summary.images, "annotations": summary.annotations,
            "categories": len(categories), "image_level_labels": image_level,
            "negative_phrases": negatives, "skipped_manifests": summary.skipped}
    fp.write('],"categories":' + json.dumps(categories, **_COMPACT) + ',"info":' + json.dumps(info) + "}")
    return summary


def _exhaustive(p: PhraseResult) -> bool | None:
    """SA-Co's is_instance_exhaustive: the human's EV decision where there is one, else the
    verifier's EV choice, else None (nobody said)."""
    if p.exhaustive is not None:
        return p.exhaustive
    ev = next((v for v in p.verdicts if v.check == "exhaustivity"), None)
    return None if ev is None else ev.choice == "accept"


def write_saco(store: ObjectStore, fp: TextIO, states: States = None, shard: Shard | None = None) -> ExportSummary:
    """SA-Co style JSON into ``fp``: ``{"pairs": [record, ...], "info": {...}}`` (``shard``: its items only).

    record: ``image`` {item_id, image_id (sha256), source, height, width (pixels), state (the
    item's), models (the encoder and decoder ids behind its machine output)}, ``phrase``, ``is_negative`` (hard negative: no masks), ``grounded`` (False: an
    image-level label without masks), ``masks`` (SA-1B records), ``score`` in [0, 1], ``verdicts``,
    ``stage``, ``state`` (the pair's routing state), ``provenance`` (model version or
    ``human:<name>``), ``is_instance_exhaustive`` (the human's EV decision, else the verifier's).
    """
    summary = ExportSummary()
    fp.write('{"pairs":[')
    for item in iter_items(store, states, summary, shard):
        summary.items += 1
        summary.images += bool(item.phrases)
        height, width = _image_size(item)
        image = {"item_id": item.item_id, "image_id": item.image_id, "source": item.source,
                 "height": height, "width": width, "state": item.state.name, "models": item.models}
        for p in item.phrases:
            # A negative's masks would contradict "verified absent"; the record keeps the verdict.
            masks = [] if p.is_negative else [{"id": i, **m.to_json()} for i, m in enumerate(p.masks)]
            record = {"image": image, "phrase": p.phrase, "is_negative": p.is_negative,
                      "grounded": p.grounded and bool(masks), "masks": masks,
                      "is_instance_exhaustive": _exhaustive(p), "score": float(p.score),
                      "verdicts": [v.to_json() for v in p.verdicts], "stage": item.stage.name,
                      "state": p.state.name, "provenance": p.provenance}
            fp.write(("," if summary.phrases else "") + json.dumps(record, **_COMPACT))
            summary.phrases += 1
            summary.annotations += len(masks)
    info = {"description": "dataengine export: SA-Co style image-noun-phrase pairs",
            **summary.to_json()}
    fp.write('],"info":' + json.dumps(info) + "}")
    return summary


def _unique_name(item: Item, taken: set[str]) -> str:
    """The source file's stem, made safe; equal stems get ``-<item_id[:8]>`` (then longer) in
    manifest order, so the first item keeps the plain name. Compared case-insensitively because
    some file systems are."""
    raw = PurePosixPath(item.source.replace("\\", "/")).stem
    stem = _UNSAFE.sub("_", raw).strip("._") or item.item_id
    first = (stem, f"{stem}-{item.item_id[:8]}", f"{stem}-{item.item_id}")
    for name in itertools.chain(first, (f"{stem}-{item.item_id}-{n}" for n in itertools.count(2))):
        if name.lower() not in taken:
            break
    taken.add(name.lower())
    return name


def _load_sa1b(store: ObjectStore, item: Item, with_image: bool) -> tuple[Item, dict, bytes | None, str]:
    """(item, its SA-1B document, its image bytes when asked, "" or why the item cannot be exported)."""
    height, width = _image_size(item)
    try:
        doc = (json.loads(store.get(item.grid_masks_key)) if item.grid_masks_key
               else sa1b_document(item.image_id, (height, width), []))
        if not isinstance(doc["image"], dict) or not isinstance(doc["annotations"], list):
            raise TypeError("image must be an object and annotations a list")
    except (KeyError, ValueError, TypeError) as exc:
        return item, {}, None, f"grid masks {item.grid_masks_key!r} unreadable: {exc}"
    try:
        return item, doc, store.get(item.image_key) if with_image else None, ""
    except KeyError as exc:  # NotFound: an SA-1B shard ships each document with its image
        return item, {}, None, f"image {item.image_key!r} unreadable: {exc}"


def sa1b_documents(store: ObjectStore, states: States, summary: ExportSummary, shard: Shard | None = None,
                   images: bool = False) -> Iterator[tuple[str, bytes, Item, bytes | None]]:
    """(file name without extension, SA-1B JSON bytes, item, image bytes if ``images``) per item,
    grid documents (and images) read ahead like manifests; shared by every SA-1B writer. An item
    without grid masks gets an empty document with its image info."""
    taken: set[str] = set()
    loaded = read_ahead(iter_items(store, states, summary, shard), lambda item: _load_sa1b(store, item, images),
                        READ_AHEAD)
    for item, doc, image_bytes, problem in loaded:
        if problem:
            # An empty document would claim "no masks"; a missing one is lost data: skip, say so.
            log.warning("export skips item %s: %s", item.item_id, problem)
            summary.skipped += 1
            continue
        image = doc["image"]
        image["file_name"] = image.get("file_name") or item.source  # the decoder leaves it blank
        image["item_id"] = item.item_id
        summary.items += 1
        summary.images += 1
        summary.phrases += len(item.phrases)
        summary.annotations += len(doc["annotations"])
        yield _unique_name(item, taken), json.dumps(doc, **_COMPACT).encode(), item, image_bytes


def write_sa1b(store: ObjectStore, out_dir: Path | str, states: States = None) -> ExportSummary:
    """One SA-1B JSON per image into ``out_dir/<stem>.json`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary()
    for name, data, _, _ in sa1b_documents(store, states, summary):
        (out / f"{name}.json").write_bytes(data)
    return summary


def write_sa1b_to_store(store: ObjectStore, prefix: str,
                        states: States = None) -> tuple[list[str], ExportSummary]:
    """One SA-1B JSON per image at ``<prefix>/<stem>.json`` in ``store``; returns (keys, summary)."""
    prefix, summary, keys = check_prefix(prefix), ExportSummary(), []
    for name, data, _, _ in sa1b_documents(store, states, summary):
        keys.append(f"{prefix}/{name}.json")
        store.put(keys[-1], data, content_type="application/json")
    return keys, summary


FILE_WRITERS: dict[str, Callable[[ObjectStore, TextIO, States, Shard | None], ExportSummary]] = {
    "coco": write_coco, "saco": write_saco}


def check_format(fmt: str) -> str:
    """The format's canonical name (``coco``, ``sa1b`` or ``saco``); raises ``InvalidInput``."""
    name = str(fmt).strip().lower()
    if name not in FORMATS:
        raise InvalidInput(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    return name


EXPORT_ROOT = "exports"  # every export into the store lands under it, never beside the engine's own data


def check_prefix(prefix: str) -> str:
    """``exports`` or a relative key under ``exports/`` (a trailing slash is dropped). An absolute
    prefix, or one elsewhere in the bucket (``images/``, ``items/`` ...), is refused, not mended."""
    text = str(prefix)
    if text.startswith("/"):
        raise InvalidInput(f"export prefix {text!r:.200} is absolute; give a relative one under {EXPORT_ROOT}/")
    prefix = check_key(text.rstrip("/"))
    if prefix != EXPORT_ROOT and not prefix.startswith(EXPORT_ROOT + "/"):
        raise InvalidInput(f"export prefix {prefix!r:.200} is outside {EXPORT_ROOT}/: exports are written under "
                           f"{EXPORT_ROOT}/ (e.g. {EXPORT_ROOT}/run1), never beside images, embeddings or manifests")
    return prefix


def export(store: ObjectStore, fmt: str, destination: Path | str, states: States = None) -> ExportSummary:
    """Export to the local file system: ``destination`` is the JSON file for coco and saco
    (written to a temporary name, then renamed, so a failed export leaves no half file) and the
    directory for sa1b. Raises ``InvalidInput`` for an unknown ``fmt``."""
    fmt, dest = check_format(fmt), Path(destination)
    if fmt == "sa1b":
        return write_sa1b(store, dest, states)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fp:
            summary = FILE_WRITERS[fmt](store, fp, states)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return summary


def export_to_store(store: ObjectStore, fmt: str, prefix: str,
                    states: States = None) -> tuple[list[str], ExportSummary]:
    """Export into ``store`` under ``prefix``: ``<prefix>/coco.json``, ``<prefix>/saco.json`` or
    ``<prefix>/<stem>.json`` per image for sa1b. Returns (keys written, summary)."""
    fmt, prefix = check_format(fmt), check_prefix(prefix)
    if fmt == "sa1b":
        return write_sa1b_to_store(store, prefix, states)
    key = f"{prefix}/{fmt}.json"
    # The store takes whole objects (bytes), so the JSON is built on disk and read back once.
    with tempfile.TemporaryFile("w+b") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8")
        summary = FILE_WRITERS[fmt](store, text, states)
        text.flush()
        text.detach()  # keep ``raw`` open: closing the wrapper would close it too
        raw.seek(0)
        store.put(key, raw.read(), content_type="application/json")
    return [key], summary
