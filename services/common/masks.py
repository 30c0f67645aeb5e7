"""SA-1B mask records: COCO compressed RLE plus SAM's quality signals, with proto/JSON converters."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from services.common.errors import InvalidInput
from services.common.pb import common_pb2


def encode_rle(mask: np.ndarray) -> dict:
    """HxW bool/uint8 mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_counts(counts: str) -> list[int]:
    """The run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``).

    pycocotools decodes without checking the runs, so a string that ends mid-number or whose runs
    do not tile the mask gives garbage; this reads them so ``decode_rle`` can check first.
    """
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise InvalidInput("the counts string ends inside a run")
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                raise InvalidInput(f"character {counts[p]!r} is not an RLE digit")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def rle_runs(rle: dict) -> tuple[int, int, list[int]]:
    """(H, W, run lengths) of a COCO RLE (compressed or not), checked.

    ``InvalidInput`` when the size is not two non-negative integers, or the runs are negative or do
    not add up to H*W (pycocotools would decode those into uninitialised memory).
    """
    if not isinstance(rle, dict):
        raise InvalidInput(f"an RLE must be a mapping with size and counts, got {type(rle).__name__}")
    size, counts = rle.get("size"), rle.get("counts")
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise InvalidInput(f"RLE size must be [H, W] with non-negative integers, got {size!r:.100}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        runs = rle_counts(counts)
    elif isinstance(counts, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        runs = list(counts)
    else:
        raise InvalidInput(f"counts must be a string or a list of ints, got {type(counts).__name__}")
    h, w = int(size[0]), int(size[1])
    if any(r < 0 for r in runs) or sum(runs) != h * w:
        raise InvalidInput(f"its runs cover {sum(runs)} pixels (some negative)" if any(r < 0 for r in runs)
                           else f"its runs cover {sum(runs)} pixels, not {h}x{w} = {h * w}")
    return h, w, runs


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed or not) -> HxW bool mask; ``InvalidInput`` as ``rle_runs``."""
    h, w, runs = rle_runs(rle)
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        coded = {"size": [h, w], "counts": counts.encode("ascii")}
    else:
        coded = mask_utils.frPyObjects({"size": [h, w], "counts": runs}, h, w)
    return mask_utils.decode(coded).astype(bool)


@dataclass
class MaskRecord:
    """One SA-1B annotation.

    segmentation: COCO compressed RLE of the full-image mask.
    bbox: XYWH pixels. area: pixels. point_coords: [[x, y], ...] prompt points in pixels.
    crop_box: XYWH of the crop the mask was generated in. source: who made it, "sam1:MODEL_ID" (the
    decoder, from a prompt), "sam3:DIR" (a segmenting grounding backend), "human:PRINCIPAL"; empty
    for grid masks (and then not written: SA-1B records stay as the official ones).
    """

    segmentation: dict
    bbox: list[float]
    area: int
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]] = field(default_factory=list)
    crop_box: list[float] = field(default_factory=list)
    source: str = ""

    def to_json(self) -> dict:
        d = {"segmentation": self.segmentation, "bbox": [float(v) for v in self.bbox],
             "area": int(self.area), "predicted_iou": float(self.predicted_iou),
             "stability_score": float(self.stability_score),
             "point_coords": [[float(x), float(y)] for x, y in self.point_coords],
             "crop_box": [float(v) for v in self.crop_box]}
        return d | {"source": self.source} if self.source else d

    @classmethod
    def from_json(cls, d: dict) -> "MaskRecord":
        return cls(segmentation=d["segmentation"], bbox=list(d["bbox"]), area=int(d["area"]),
                   predicted_iou=float(d["predicted_iou"]), stability_score=float(d["stability_score"]),
                   point_coords=[list(p) for p in d.get("point_coords", [])],
                   crop_box=list(d.get("crop_box", [])), source=str(d.get("source", "")))

    def to_proto(self) -> common_pb2.Mask:
        return common_pb2.Mask(
            segmentation=common_pb2.Rle(size=self.segmentation["size"], counts=self.segmentation["counts"]),
            bbox=self.bbox, area=self.area, predicted_iou=self.predicted_iou,
            stability_score=self.stability_score,
            point_coords=[common_pb2.Point(x=x, y=y, label=1) for x, y in self.point_coords],
            crop_box=self.crop_box, source=self.source)

    @classmethod
    def from_proto(cls, m: common_pb2.Mask) -> "MaskRecord":
        return cls(segmentation={"size": list(m.segmentation.size), "counts": m.segmentation.counts},
                   bbox=list(m.bbox), area=m.area, predicted_iou=m.predicted_iou,
                   stability_score=m.stability_score,
                   point_coords=[[p.x, p.y] for p in m.point_coords], crop_box=list(m.crop_box),
                   source=m.source)

    def decode(self) -> np.ndarray:
        return decode_rle(self.segmentation)


def sa1b_document(image_id: str, size: tuple[int, int], records: list[MaskRecord],
                  file_name: str = "") -> dict:
    """One image's SA-1B JSON: ``{"image": {...}, "annotations": [...]}``; size is (H, W) pixels."""
    return {
        "image": {"image_id": image_id, "height": int(size[0]), "width": int(size[1]),
                  "file_name": file_name},
        "annotations": [{"id": i, **rec.to_json()} for i, rec in enumerate(records)],
    }
