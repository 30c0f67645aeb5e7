"""Verifier results: typed containers shared by the verifier (which writes them) and the
orchestrator (which routes by them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.pb import common_pb2


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
