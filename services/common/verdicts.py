"""Verifier results: typed containers shared by the verifier (which writes them) and the
orchestrator (which routes by them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidInput
from services.common.pb import common_pb2, verifier_pb2


@dataclass
class Verdict:
    """One verifier conclusion about a phrase (``check``: mask, exhaustivity, hard_negative)."""

    check: str
    choice: str
    score: float
    source: str = ""
    phrase: str = ""
    mask_indices: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"check": self.check, "choice": self.choice, "score": float(self.score), "source": self.source,
                "phrase": self.phrase, "mask_indices": [int(i) for i in self.mask_indices]}

    @classmethod
    def from_json(cls, d: dict) -> "Verdict":
        return cls(check=d["check"], choice=d["choice"], score=float(d["score"]), source=d.get("source", ""),
                   phrase=d.get("phrase", ""), mask_indices=[int(i) for i in d.get("mask_indices", [])])

    def to_proto(self) -> common_pb2.Verdict:
        return common_pb2.Verdict(check=self.check, choice=self.choice, score=self.score, source=self.source,
                                  phrase=self.phrase, mask_indices=self.mask_indices)

    @classmethod
    def from_proto(cls, v: common_pb2.Verdict) -> "Verdict":
        return cls(check=v.check, choice=v.choice, score=v.score, source=v.source, phrase=v.phrase,
                   mask_indices=list(v.mask_indices))


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a finite number, got {value!r:.100}")
    return float(value)


@dataclass
class PairVerdict:
    """The verifier's result for one image–noun-phrase pair (the unit of routing).

    is_negative: the pair is a hard negative (verified absent, no masks).
    score: the pair's aggregate in [0, 1], the probability that it is right as proposed.
    verdicts: the checks behind the score. mask_count: masks the pair was verified with.
    """

    phrase: str
    is_negative: bool
    score: float
    verdicts: list[Verdict] = field(default_factory=list)
    mask_count: int = 0

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "is_negative": bool(self.is_negative), "score": float(self.score),
                "verdicts": [v.to_json() for v in self.verdicts], "mask_count": int(self.mask_count)}

    @classmethod
    def from_json(cls, d: Any, what: str = "verification pair") -> "PairVerdict":
        """Parse JSON; anything malformed is ``InvalidInput`` naming ``what``."""
        if not isinstance(d, dict):
            raise InvalidInput(f"{what} must be a JSON object, got {type(d).__name__}")
        phrase, verdicts = d.get("phrase"), d.get("verdicts", [])
        if not isinstance(phrase, str) or not isinstance(d.get("is_negative"), bool) or not isinstance(verdicts, list):
            raise InvalidInput(f"{what} needs 'phrase' (text), 'is_negative' (bool) and 'verdicts' (a list), "
                               f"got {d!r:.200}")
        try:
            parsed = [Verdict.from_json(v) for v in verdicts]
            mask_count = int(d.get("mask_count", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{what} has a malformed verdict or mask_count: {exc!r}") from None
        return cls(phrase=phrase, is_negative=d["is_negative"], score=_finite(d.get("score"), f"{what} score"),
                   verdicts=parsed, mask_count=mask_count)

    def to_proto(self) -> verifier_pb2.PairVerdicts:
        """The proto carries no is_negative or mask_count: a client matches pairs by phrase,
        which is unique within one verification."""
        return verifier_pb2.PairVerdicts(phrase=self.phrase, verdicts=[v.to_proto() for v in self.verdicts],
                                         score=self.score)


@dataclass
class Verification:
    """All pair results of one image and the item's score in [0, 1] (what the orchestrator routes by)."""

    pairs: list[PairVerdict]
    score: float

    def to_json(self) -> dict:
        return {"pairs": [p.to_json() for p in self.pairs], "score": float(self.score)}

    @classmethod
    def from_json(cls, d: Any) -> "Verification":
        """Parse the stored JSON; anything malformed is ``InvalidInput`` naming the field."""
        if not isinstance(d, dict) or not isinstance(d.get("pairs"), list) or "score" not in d:
            raise InvalidInput(f"a verification needs 'pairs' (a list) and 'score', got {d!r:.200}")
        return cls(pairs=[PairVerdict.from_json(p, f"verification pairs[{i}]") for i, p in enumerate(d["pairs"])],
                   score=_finite(d["score"], "verification score"))

    def to_proto(self) -> verifier_pb2.VerifyResponse:
        return verifier_pb2.VerifyResponse(pairs=[p.to_proto() for p in self.pairs], score=self.score)
