"""Concept proposals: the noun phrases and hard negatives proposed for one image.

Written by the concepts service (``Proposal`` JSON at ``step_key(item_id, "propose")``), read by
the decoder (to ground phrases) and the verifier (to verify hard negatives). Every constructor
validates, so a malformed proposal fails where it is read, with ``InvalidInput`` naming the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidInput
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


@dataclass(frozen=True)
class NounPhrase:
    """A phrase proposed as present in the image.

    score: the backend's confidence in [0, 1]. source: backend and model version.
    box: XYXY pixels of the original image, or None. point: XY pixels, or None.
    Without a box or a point the phrase is an image-level label (the decoder cannot ground it).
    """

    text: str
    score: float = 1.0
    source: str = ""
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        what = f"noun phrase {self.text!r:.60}"
        object.__setattr__(self, "text", _text(self.text, "noun phrase text").strip())
        object.__setattr__(self, "score", _unit_score(self.score, f"{what} score"))
        if not isinstance(self.source, str):
            raise InvalidInput(f"{what} source must be text, got {self.source!r:.60}")
        box = _coords(self.box, 4, f"{what} box")
        if box is not None and (box[2] < box[0] or box[3] < box[1]):
            raise InvalidInput(f"{what} box must be XYXY with x0 <= x1 and y0 <= y1, got {list(box)}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "point", _coords(self.point, 2, f"{what} point"))

    @property
    def grounded(self) -> bool:
        """True when a box or a point tells the decoder where the phrase is."""
        return self.box is not None or self.point is not None

    def to_json(self) -> dict:
        return {"text": self.text, "score": self.score, "source": self.source,
                "box": None if self.box is None else list(self.box),
                "point": None if self.point is None else list(self.point)}

    @classmethod
    def from_json(cls, d: Any, what: str = "noun phrase") -> "NounPhrase":
        d = _fields(d, what, ("text",))
        return cls(text=d["text"], score=d.get("score", 1.0), source=d.get("source", ""),
                   box=d.get("box"), point=d.get("point"))

    def to_proto(self) -> common_pb2.NounPhrase:
        msg = common_pb2.NounPhrase(text=self.text, score=self.score, source=self.source)
        if self.box is not None:
            msg.box.CopyFrom(common_pb2.Box(x0=self.box[0], y0=self.box[1], x1=self.box[2], y1=self.box[3]))
        if self.point is not None:
            msg.point.CopyFrom(common_pb2.Point(x=self.point[0], y=self.point[1], label=1))
        return msg

    @classmethod
    def from_proto(cls, msg: common_pb2.NounPhrase) -> "NounPhrase":
        box = (msg.box.x0, msg.box.y0, msg.box.x1, msg.box.y1) if msg.HasField("box") else None
        point = (msg.point.x, msg.point.y) if msg.HasField("point") else None
        return cls(text=msg.text, score=msg.score, source=msg.source, box=box, point=point)


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
