"""Concept proposals: the noun phrases and hard negatives proposed for one image.

Written by the concepts service (``Proposal`` JSON at ``step_key(item_id, "propose")``), read by
the decoder (to ground phrases) and the verifier (to verify hard negatives). Every constructor
validates, so a malformed proposal fails where it is read, with ``InvalidInput`` naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from pycocotools import mask as mask_utils

from services.common.errors import InvalidInput
from services.common.masks import decode_rle, encode_rle, rle_runs
from services.common.pb import common_pb2, concepts_pb2

# HardNegative.reason values the proto documents; other backends may add their own.
HARD_NEGATIVE_REASONS = (
    "ontology_sibling", "ontology_lookalike", "ontology_cousin", "ontology_uncle", "attribute_swap", "model")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be non-empty text, got {value!r:.100}")
    return value


def _number(value: Any, what: str) -> float:
    # bool is an int in Python but never a score or a coordinate in JSON
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {value!r:.100}")
    return float(value)


def _unit_score(value: Any, what: str) -> float:
    score = _number(value, what)
    if not 0.0 <= score <= 1.0:
        raise InvalidInput(f"{what} must be in [0, 1], got {score}")
    return score


def _coords(value: Any, n: int, what: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise InvalidInput(f"{what} must be {n} numbers or null, got {value!r:.100}")
    return tuple(_number(v, f"{what}[{i}]") for i, v in enumerate(value))


def _fields(d: Any, what: str, required: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(d).__name__}")
    missing = [name for name in required if name not in d]
    if missing:
        raise InvalidInput(f"{what} lacks {', '.join(repr(m) for m in missing)}")
    return d


DUPLICATE_IOU = 0.7  # two instances of one phrase whose boxes overlap this much are one (SAM's box NMS)


def _box(value: Any, what: str) -> tuple[float, float, float, float] | None:
    box = _coords(value, 4, what)
    if box is not None and (box[2] < box[0] or box[3] < box[1]):
        raise InvalidInput(f"{what} must be XYXY with x0 <= x1 and y0 <= y1, got {list(box)}")
    return box  # type: ignore[return-value]


def _rle(value: Any, what: str) -> dict | None:
    if value is None:
        return None
    try:
        h, w, _ = rle_runs(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    counts = value["counts"]
    if not isinstance(counts, str):  # uncompressed runs: stored compressed, as every other mask
        counts = encode_rle(decode_rle(value))["counts"]
    return {"size": [h, w], "counts": counts}


@dataclass(frozen=True)
class Instance:
    """One instance of a noun phrase: where it is, how sure the backend is, and which model found it.

    box: XYXY pixels of the original image, or None. point: XY pixels, or None. mask: COCO
    compressed RLE ``{"size": [H, W], "counts": str}`` of the whole image when the backend segments
    (SAM 3), or None: the decoder makes the mask from the box or point. score: in [0, 1].
    source: the model that found it ("sam3:DIR", "owlv2:DIR", "openai:MODEL"). At least one of
    box, point and mask is given.
    """

    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    score: float = 1.0
    mask: dict | None = None
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", _box(self.box, "instance box"))
        object.__setattr__(self, "point", _coords(self.point, 2, "instance point"))
        object.__setattr__(self, "score", _unit_score(self.score, "instance score"))
        object.__setattr__(self, "mask", _rle(self.mask, "instance mask"))
        if not isinstance(self.source, str):
            raise InvalidInput(f"instance source must be text, got {self.source!r:.60}")
        if self.box is None and self.point is None and self.mask is None:
            raise InvalidInput("an instance needs a box, a point or a mask")

    def extent(self) -> tuple[float, float, float, float] | None:
        """XYXY pixels: the box, else the mask's bounding box, else None (a point alone)."""
        if self.box is not None:
            return self.box
        if self.mask is not None:
            x, y, w, h = mask_utils.toBbox({"size": self.mask["size"], "counts": self.mask["counts"].encode()}).tolist()
            return (x, y, x + w, y + h)
        return None

    def same_as(self, other: "Instance") -> bool:
        """True when both name one object: boxes (or mask extents) overlapping by ``DUPLICATE_IOU``
        or more, or the same point when neither has an extent."""
        a, b = self.extent(), other.extent()
        if a is not None and b is not None:
            return box_iou(a, b) >= DUPLICATE_IOU
        return a is None and b is None and self.point == other.point

    def to_json(self) -> dict:
        return {"box": None if self.box is None else list(self.box),
                "point": None if self.point is None else list(self.point),
                "score": self.score, "mask": self.mask, "source": self.source}

    @classmethod
    def from_json(cls, d: Any, what: str = "instance") -> "Instance":
        d = _fields(d, what, ())
        try:
            return cls(box=d.get("box"), point=d.get("point"), score=d.get("score", 1.0), mask=d.get("mask"),
                       source=d.get("source", ""))
        except InvalidInput as exc:
            raise InvalidInput(f"{what}: {exc}") from None

    def to_proto(self) -> common_pb2.Instance:
        msg = common_pb2.Instance(score=self.score, source=self.source)
        if self.box is not None:
            msg.box.CopyFrom(common_pb2.Box(x0=self.box[0], y0=self.box[1], x1=self.box[2], y1=self.box[3]))
        if self.point is not None:
            msg.point.CopyFrom(common_pb2.Point(x=self.point[0], y=self.point[1], label=1))
        if self.mask is not None:
            msg.mask.CopyFrom(common_pb2.Rle(size=self.mask["size"], counts=self.mask["counts"]))
        return msg

    @classmethod
    def from_proto(cls, msg: common_pb2.Instance) -> "Instance":
        return cls(box=_box_of(msg) if msg.HasField("box") else None,
                   point=(msg.point.x, msg.point.y) if msg.HasField("point") else None, score=msg.score,
                   mask={"size": list(msg.mask.size), "counts": msg.mask.counts} if msg.HasField("mask") else None,
                   source=msg.source)


def _box_of(msg) -> tuple[float, float, float, float]:
    return (msg.box.x0, msg.box.y0, msg.box.x1, msg.box.y1)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two XYXY boxes (0 when both are empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_instances(instances: Sequence[Instance]) -> tuple[Instance, ...]:
    """``instances`` without duplicates (``Instance.same_as``): of two, the higher score stays, in
    the place of the first; a mask is kept over a box (it is the better answer to "which pixels")."""
    kept: list[Instance] = []
    for inst in instances:
        for i, other in enumerate(kept):
            if inst.same_as(other):
                better = inst if (inst.score, inst.mask is not None) > (other.score, other.mask is not None) else other
                kept[i] = better
                break
        else:
            kept.append(inst)
    return tuple(kept)


@dataclass(frozen=True)
class NounPhrase:
    """A phrase proposed as present in the image, with every instance of it a backend found.

    score: the backend's confidence in [0, 1] that the phrase is present. source: backend and
    model version. instances: where it is (``Instance``); none makes the phrase an image-level
    label (the decoder cannot ground it).
    """

    text: str
    score: float = 1.0
    source: str = ""
    instances: tuple[Instance, ...] = ()

    def __post_init__(self) -> None:
        what = f"noun phrase {self.text!r:.60}"
        object.__setattr__(self, "text", _text(self.text, "noun phrase text").strip())
        object.__setattr__(self, "score", _unit_score(self.score, f"{what} score"))
        if not isinstance(self.source, str):
            raise InvalidInput(f"{what} source must be text, got {self.source!r:.60}")
        instances = tuple(self.instances)
        if not all(isinstance(i, Instance) for i in instances):
            raise InvalidInput(f"{what} instances must be Instance objects")
        object.__setattr__(self, "instances", instances)

    @classmethod
    def at(cls, text: str, score: float = 1.0, source: str = "", box=None, point=None) -> "NounPhrase":
        """A phrase with one instance at ``box`` and/or ``point`` (none: no instance), of the phrase's
        score and source: what a one-box proposal says."""
        if box is None and point is None:
            return cls(text, score, source)
        try:
            instance = Instance(box, point, score, source=source)
        except InvalidInput as exc:
            raise InvalidInput(f"noun phrase {text!r:.60}: {exc}") from None
        return cls(text, score, source, (instance,))

    @property
    def grounded(self) -> bool:
        """True when an instance tells the decoder where the phrase is."""
        return bool(self.instances)

    def merged(self, other: "NounPhrase") -> "NounPhrase":
        """This phrase with ``other``'s instances joined (duplicates removed) and the higher score."""
        return replace(self, score=max(self.score, other.score),
                       instances=merge_instances(self.instances + other.instances))

    def to_json(self) -> dict:
        return {"text": self.text, "score": self.score, "source": self.source,
                "instances": [i.to_json() for i in self.instances]}

    @classmethod
    def from_json(cls, d: Any, what: str = "noun phrase") -> "NounPhrase":
        """Reads both forms: ``instances`` (a list), and the one-instance ``box``/``point`` of
        proposals written before instances."""
        d = _fields(d, what, ("text",))
        raw = d.get("instances", [])
        if not isinstance(raw, list):
            raise InvalidInput(f"{what} instances must be a list, got {type(raw).__name__}")
        instances = tuple(Instance.from_json(inst, f"{what} instances[{i}]") for i, inst in enumerate(raw))
        legacy = cls.at(d["text"], d.get("score", 1.0), d.get("source", ""), d.get("box"), d.get("point"))
        return replace(legacy, instances=legacy.instances + instances)

    def to_proto(self) -> common_pb2.NounPhrase:
        return common_pb2.NounPhrase(text=self.text, score=self.score, source=self.source,
                                     instances=[i.to_proto() for i in self.instances])

    @classmethod
    def from_proto(cls, msg: common_pb2.NounPhrase) -> "NounPhrase":
        """Reads the deprecated one-instance ``box``/``point`` fields too."""
        legacy = cls.at(msg.text, msg.score, msg.source, _box_of(msg) if msg.HasField("box") else None,
                        (msg.point.x, msg.point.y) if msg.HasField("point") else None)
        return replace(legacy, instances=legacy.instances + tuple(Instance.from_proto(i) for i in msg.instances))


@dataclass(frozen=True)
class HardNegative:
    """A phrase proposed as absent but visually close to a positive (verified absent later).

    reason: why it was proposed (see ``HARD_NEGATIVE_REASONS``). score: confidence in [0, 1].
    """

    text: str
    reason: str = "model"
    score: float = 1.0
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", _text(self.text, "hard negative text").strip())
        what = f"hard negative {self.text!r:.60}"
        object.__setattr__(self, "reason", _text(self.reason, f"{what} reason"))
        object.__setattr__(self, "score", _unit_score(self.score, f"{what} score"))
        if not isinstance(self.source, str):
            raise InvalidInput(f"{what} source must be text, got {self.source!r:.60}")

    def to_json(self) -> dict:
        return {"text": self.text, "reason": self.reason, "score": self.score, "source": self.source}

    @classmethod
    def from_json(cls, d: Any, what: str = "hard negative") -> "HardNegative":
        d = _fields(d, what, ("text", "reason"))
        return cls(text=d["text"], reason=d["reason"], score=d.get("score", 1.0), source=d.get("source", ""))

    def to_proto(self) -> common_pb2.HardNegative:
        return common_pb2.HardNegative(text=self.text, reason=self.reason, score=self.score, source=self.source)

    @classmethod
    def from_proto(cls, msg: common_pb2.HardNegative) -> "HardNegative":
        return cls(text=msg.text, reason=msg.reason, score=msg.score, source=msg.source)


@dataclass
class Proposal:
    """What a concepts backend proposes for one image: positives first, then hard negatives.

    Phrases are unique case-insensitively, and no phrase is both positive and negative: later
    stages key results by phrase, so a duplicate would silently overwrite another's verdicts.
    """

    phrases: list[NounPhrase] = field(default_factory=list)
    hard_negatives: list[HardNegative] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.phrases, self.hard_negatives = list(self.phrases), list(self.hard_negatives)
        seen: dict[str, str] = {}
        for kind, items in (("noun phrase", self.phrases), ("hard negative", self.hard_negatives)):
            for item in items:
                folded = item.text.casefold()
                if folded in seen:
                    raise InvalidInput(f"{kind} {item.text!r} repeats the {seen[folded]} of the same text")
                seen[folded] = kind

    def to_json(self) -> dict:
        return {"phrases": [p.to_json() for p in self.phrases],
                "hard_negatives": [n.to_json() for n in self.hard_negatives]}

    @classmethod
    def from_json(cls, d: Any) -> "Proposal":
        d = _fields(d, "proposal", ("phrases",))
        phrases, negatives = d["phrases"], d.get("hard_negatives", [])
        for name, value in (("phrases", phrases), ("hard_negatives", negatives)):
            if not isinstance(value, list):
                raise InvalidInput(f"proposal {name} must be a list, got {type(value).__name__}")
        return cls(phrases=[NounPhrase.from_json(p, f"phrases[{i}]") for i, p in enumerate(phrases)],
                   hard_negatives=[HardNegative.from_json(n, f"hard_negatives[{i}]")
                                   for i, n in enumerate(negatives)])

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json()).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: str = "proposal") -> "Proposal":
        """Parse stored JSON; anything unreadable is ``InvalidInput`` naming ``key``."""
        try:
            return cls.from_json(json.loads(data))
        except ValueError as exc:  # JSONDecodeError and InvalidInput alike
            raise InvalidInput(f"concepts output {key!r} is not a proposal: {exc}") from None

    def to_proto(self) -> concepts_pb2.ProposeResponse:
        return concepts_pb2.ProposeResponse(phrases=[p.to_proto() for p in self.phrases],
                                            hard_negatives=[n.to_proto() for n in self.hard_negatives])

    @classmethod
    def from_proto(cls, msg: concepts_pb2.ProposeResponse) -> "Proposal":
        return cls(phrases=[NounPhrase.from_proto(p) for p in msg.phrases],
                   hard_negatives=[HardNegative.from_proto(n) for n in msg.hard_negatives])
