"""What the decode step writes for an item: its grid masks' key and its phrases, grounded to
masks where the concepts backend gave a box or a point (shared by decoder, verifier, orchestrator)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from services.common.errors import InvalidInput
from services.common.masks import MaskRecord


@dataclass
class GroundedPhrase:
    """phrase: the noun phrase. masks: its instances (empty for a hard negative, or when nothing
    grounded it: ``grounded`` is False and the phrase is an image-level label). source: who proposed it."""

    phrase: str
    is_negative: bool = False
    masks: list[MaskRecord] = field(default_factory=list)
    grounded: bool = False
    source: str = ""

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "is_negative": self.is_negative, "masks": [m.to_json() for m in self.masks],
                "grounded": self.grounded, "source": self.source}

    @classmethod
    def from_json(cls, d: dict) -> "GroundedPhrase":
        return cls(phrase=str(d["phrase"]), is_negative=bool(d.get("is_negative", False)),
                   masks=[MaskRecord.from_json(m) for m in d.get("masks", [])],
                   grounded=bool(d.get("grounded", False)), source=str(d.get("source", "")))


@dataclass
class DecodeOutput:
    """masks_key: SA-1B JSON of the class-agnostic grid masks; grid_count: how many it holds (None:
    written by an older decoder, which did not say). phrases: positives, then negatives."""

    masks_key: str
    phrases: list[GroundedPhrase] = field(default_factory=list)
    grid_count: int | None = None

    def to_bytes(self) -> bytes:
        return json.dumps({"masks_key": self.masks_key, "phrases": [p.to_json() for p in self.phrases],
                           "grid_count": self.grid_count}).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: str = "decode output") -> "DecodeOutput":
        try:
            d = json.loads(data)
            count = d.get("grid_count")
            return cls(masks_key=str(d["masks_key"]), phrases=[GroundedPhrase.from_json(p) for p in d["phrases"]],
                       grid_count=None if count is None else int(count))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{key} is not a decode output: {exc!r}") from None
