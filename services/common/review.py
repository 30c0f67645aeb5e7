"""The human review's typed containers: leases, what an annotator submits, what the manifest keeps.

Shared by the orchestrator (which validates and stores them) and the studio (which builds them from
the browser's JSON and sends them over gRPC or in process).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
import numpy as np
from pycocotools import mask as mask_utils

from services.common.errors import InvalidInput
from services.common.masks import MaskRecord, rle_runs
from services.common.pb import common_pb2, orchestrator_pb2

_NAME = re.compile(r"^[\w .@-]{1,64}$")
ORIGINS = ("model", "human")
NEGATIVE_CHECKS = ("", "absent", "present")
MAX_PHRASES = 256  # far beyond any image's phrases; bounds one submission's work
MAX_MASKS = 1024


def annotator_name(text: str) -> str:
    """The one check of an annotator's name: the identity every review is marked with
    (``human:<name>``); the security issue puts a token behind it."""
    name = (text or "").strip()
    if not _NAME.fullmatch(name):
        raise InvalidInput(f"annotator name {text!r:.80} must be 1-64 letters, digits, spaces or ._-@")
    return name


@dataclass
class Lease:
    """An annotator's claim on one item; ``token`` proves it. Times are unix seconds."""

    item_id: str
    annotator: str
    token: str
    claimed_at: float
    expires_at: float

    def live(self, now: float) -> bool:
        return now < self.expires_at

    def to_json(self) -> dict:
        return {"item_id": self.item_id, "annotator": self.annotator, "token": self.token,
                "claimed_at": self.claimed_at, "expires_at": self.expires_at}

    @classmethod
    def from_json(cls, d: dict) -> "Lease":
        return cls(str(d["item_id"]), str(d["annotator"]), str(d["token"]), float(d["claimed_at"]),
                   float(d["expires_at"]))

    def to_proto(self) -> orchestrator_pb2.Lease:
        return orchestrator_pb2.Lease(item_id=self.item_id, annotator=self.annotator, token=self.token,
                                      claimed_at=self.claimed_at, expires_at=self.expires_at)

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.Lease) -> "Lease":
        return cls(p.item_id, p.annotator, p.token, p.claimed_at, p.expires_at)


def checked_mask(record: MaskRecord, size: tuple[int, int], what: str) -> MaskRecord:
    """``record`` with bbox and area recomputed from its RLE, which must tile an image of ``size``
    (H, W); scores clipped to [0, 1]. ``InvalidInput`` naming ``what`` otherwise.

    A client's bbox and area are never trusted: exports and figures read them.
    """
    try:
        h, w, _ = rle_runs(record.segmentation)
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    if (h, w) != tuple(size):
        raise InvalidInput(f"{what} is {h}x{w} (H x W) but the image is {size[0]}x{size[1]}")
    counts = record.segmentation["counts"]
    rle = ({"size": [h, w], "counts": counts.encode("ascii")} if isinstance(counts, str)
           else mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w))
    x, y, bw, bh = mask_utils.toBbox(rle).tolist()
    segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}

    def unit(v: float) -> float:
        return min(1.0, max(0.0, float(v))) if math.isfinite(v) else 0.0

    points = [[float(px), float(py)] for px, py in record.point_coords
              if math.isfinite(px) and math.isfinite(py)]
    crop = [float(v) for v in record.crop_box]
    if len(crop) != 4 or not all(math.isfinite(v) for v in crop):
        crop = [0.0, 0.0, float(w), float(h)]  # a mask drawn by hand covers the whole frame
    # COCO's bbox (pixels counted, as pycocotools reads it off the RLE), what the exports carry.
    return MaskRecord(segmentation=segmentation, bbox=[x, y, bw, bh], area=int(mask_utils.area(rle)),
                      predicted_iou=unit(record.predicted_iou), stability_score=unit(record.stability_score),
                      point_coords=points, crop_box=crop, source=record.source)


@dataclass
class ReviewedMask:
    """One mask as the annotator left it: MV decision (``accept``) and ``origin`` (model / human)."""

    mask: MaskRecord
    accept: bool = True
    origin: str = "human"

    def __post_init__(self) -> None:
        if self.origin not in ORIGINS:
            raise InvalidInput(f"mask origin must be one of {', '.join(ORIGINS)}, got {self.origin!r}")

    def to_proto(self) -> orchestrator_pb2.ReviewedMask:
        return orchestrator_pb2.ReviewedMask(mask=self.mask.to_proto(), accept=self.accept, origin=self.origin)

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.ReviewedMask) -> "ReviewedMask":
        return cls(MaskRecord.from_proto(p.mask), p.accept, p.origin or "human")


@dataclass
class ReviewedPhrase:
    """One phrase as the annotator left it.

    original_phrase: as proposed ("" when the human added it). is_negative: a hard negative
    confirmed absent. exhaustive: the EV decision (None: not decided). negative_check: for a
    proposed hard negative, "absent" or "present" (then it is a positive with masks).
    """

    phrase: str
    original_phrase: str = ""
    is_negative: bool = False
    masks: list[ReviewedMask] = field(default_factory=list)
    exhaustive: bool | None = None
    ungroundable: bool = False
    negative_check: str = ""

    def __post_init__(self) -> None:
        self.phrase = " ".join(self.phrase.split())
        if not self.phrase:
            raise InvalidInput("a reviewed phrase needs a non-empty text")
        if len(self.phrase) > 200:
            raise InvalidInput(f"phrase {self.phrase[:40]!r}... is over 200 characters")
        if self.negative_check not in NEGATIVE_CHECKS:
            raise InvalidInput(f"negative_check of {self.phrase!r} must be 'absent', 'present' or empty, "
                               f"got {self.negative_check!r}")
        if self.is_negative and any(m.accept for m in self.masks):
            raise InvalidInput(f"hard negative {self.phrase!r} is absent by definition but has accepted masks; "
                               "mark it present to mask it")
        if self.is_negative and self.negative_check == "present":
            raise InvalidInput(f"{self.phrase!r} is marked present, so it cannot stay a hard negative")

    @property
    def kept(self) -> list[MaskRecord]:
        """The masks that go into the dataset (accepted ones)."""
        return [m.mask for m in self.masks if m.accept]

    def to_proto(self) -> orchestrator_pb2.ReviewedPhrase:
        p = orchestrator_pb2.ReviewedPhrase(
            phrase=self.phrase, original_phrase=self.original_phrase, is_negative=self.is_negative,
            masks=[m.to_proto() for m in self.masks], ungroundable=self.ungroundable,
            negative_check=self.negative_check)
        if self.exhaustive is not None:
            p.exhaustive = self.exhaustive
        return p

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.ReviewedPhrase) -> "ReviewedPhrase":
        return cls(phrase=p.phrase, original_phrase=p.original_phrase, is_negative=p.is_negative,
                   masks=[ReviewedMask.from_proto(m) for m in p.masks],
                   exhaustive=p.exhaustive if p.HasField("exhaustive") else None,
                   ungroundable=p.ungroundable, negative_check=p.negative_check)


@dataclass
class ReviewSubmission:
    """An annotator's decision on a claimed item: accept with ``phrases`` (their masks and MV/EV
    decisions), or discard. ``seconds_spent``: the client's own measure (the server keeps its own)."""

    item_id: str
    annotator: str
    lease_token: str
    accept: bool
    phrases: list[ReviewedPhrase] = field(default_factory=list)
    seconds_spent: float = 0.0

    def __post_init__(self) -> None:
        if not self.item_id:
            raise InvalidInput("item_id is empty")
        if not self.annotator.strip():
            raise InvalidInput("a review needs the annotator's name")
        if len(self.phrases) > MAX_PHRASES:
            raise InvalidInput(f"{len(self.phrases)} phrases; at most {MAX_PHRASES}")
        if sum(len(p.masks) for p in self.phrases) > MAX_MASKS:
            raise InvalidInput(f"more than {MAX_MASKS} masks in one review")
        seen: set[tuple[str, bool]] = set()
        for p in self.phrases:
            if (p.phrase, p.is_negative) in seen:
                raise InvalidInput(f"phrase {p.phrase!r} appears twice; give each phrase once with all its masks")
            seen.add((p.phrase, p.is_negative))
        if not math.isfinite(self.seconds_spent) or self.seconds_spent < 0:
            raise InvalidInput(f"seconds_spent must be a non-negative number, got {self.seconds_spent}")

    def checked(self, size: tuple[int, int]) -> "ReviewSubmission":
        """Every mask checked against the image's (H, W) and its bbox and area recomputed."""
        for i, p in enumerate(self.phrases):
            for j, m in enumerate(p.masks):
                m.mask = checked_mask(m.mask, size, f"mask {j} of phrase {i} ({p.phrase!r})")
        return self

    def to_proto(self) -> orchestrator_pb2.SubmitReviewRequest:
        return orchestrator_pb2.SubmitReviewRequest(
            item_id=self.item_id, annotator=self.annotator, lease_token=self.lease_token, accept=self.accept,
            reviewed=[p.to_proto() for p in self.phrases], seconds_spent=self.seconds_spent)

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.SubmitReviewRequest) -> "ReviewSubmission":
        phrases = [ReviewedPhrase.from_proto(r) for r in p.reviewed]
        # The older form (PhraseResult): every mask the client sent is accepted.
        for old in p.phrases:
            if old.state not in common_pb2.ItemState.values():
                raise InvalidInput(f"phrase {old.phrase!r} has unknown state {old.state}")
            phrases.append(ReviewedPhrase(
                phrase=old.phrase, original_phrase=old.phrase, is_negative=old.is_negative,
                masks=[ReviewedMask(MaskRecord.from_proto(m), True, "human") for m in old.masks]))
        return cls(item_id=p.item_id, annotator=p.annotator, lease_token=p.lease_token, accept=p.accept,
                   phrases=phrases, seconds_spent=p.seconds_spent)


@dataclass
class ReviewRecord:
    """What the manifest keeps of one human review (``kind`` "review") or audit ("audit").

    mv: per judged mask ``{"phrase", "mask" (SA-1B record), "accept", "origin", "model_score"}``
        (the machine's MV score for a model mask, else None): the verifier's training labels.
    ev: per phrase with a decision ``{"phrase", "exhaustive", "model_score"}``.
    negatives: ``{"phrase", "check"}`` per proposed hard negative the human checked.
    seconds: claim to submit, as the server measured it; client_seconds as the page did.
    agreement: for an audit, ``{"decision": share of decisions agreed, "mask_iou": mean IoU}``.
    """

    annotator: str
    kind: str
    accept: bool
    claimed_at: float
    submitted_at: float
    seconds: float
    client_seconds: float = 0.0
    masks: int = 0
    mv: list[dict] = field(default_factory=list)
    ev: list[dict] = field(default_factory=list)
    negatives: list[dict] = field(default_factory=list)
    phrases: list[dict] = field(default_factory=list)  # audits: the auditor's phrases, kept as judged
    agreement: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"annotator": self.annotator, "kind": self.kind, "accept": self.accept,
                "claimed_at": self.claimed_at, "submitted_at": self.submitted_at, "seconds": self.seconds,
                "client_seconds": self.client_seconds, "masks": self.masks, "mv": self.mv, "ev": self.ev,
                "negatives": self.negatives, "phrases": self.phrases, "agreement": self.agreement}

    @classmethod
    def from_json(cls, d: dict) -> "ReviewRecord":
        return cls(annotator=d["annotator"], kind=d["kind"], accept=bool(d["accept"]),
                   claimed_at=float(d["claimed_at"]), submitted_at=float(d["submitted_at"]),
                   seconds=float(d["seconds"]), client_seconds=float(d.get("client_seconds", 0.0)),
                   masks=int(d.get("masks", 0)), mv=list(d.get("mv", [])), ev=list(d.get("ev", [])),
                   negatives=list(d.get("negatives", [])), phrases=list(d.get("phrases", [])),
                   agreement={str(k): float(v) for k, v in d.get("agreement", {}).items()})


@dataclass
class AnnotatorFigures:
    """One annotator's throughput (reviews, audits excluded) and how audits agreed with them."""

    annotator: str
    items: int = 0
    masks: int = 0
    seconds: float = 0.0
    audits: int = 0
    audit_decision_agreement: float = 0.0
    audit_mask_iou: float = 0.0

    @staticmethod
    def _rate(n: float, per: float, digits: int = 3) -> float | None:
        return round(float(n / per), digits) if per > 0 else None

    def to_json(self) -> dict:
        """Rates are None (JSON null) where they are undefined: no time, no mask, no audit."""
        hours = self.seconds / 3600.0
        audited = self.audits > 0
        return {"annotator": self.annotator, "items": self.items, "masks": self.masks,
                "seconds": round(self.seconds, 3), "items_per_hour": self._rate(self.items, hours),
                "masks_per_hour": self._rate(self.masks, hours),
                "seconds_per_item": self._rate(self.seconds, self.items),
                "seconds_per_mask": self._rate(self.seconds, self.masks), "audits": self.audits,
                "audit_decision_agreement": round(self.audit_decision_agreement, 4) if audited else None,
                "audit_mask_iou": round(self.audit_mask_iou, 4) if audited else None}

    def to_proto(self) -> orchestrator_pb2.AnnotatorFigures:
        """The proto's rates are 0 where the JSON's are null (proto3 doubles have no null): read
        them with ``items``, ``masks``, ``seconds`` and ``audits``."""
        return orchestrator_pb2.AnnotatorFigures(**{k: (0.0 if v is None else v) for k, v in self.to_json().items()})

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.AnnotatorFigures) -> "AnnotatorFigures":
        return cls(p.annotator, p.items, p.masks, p.seconds, p.audits, p.audit_decision_agreement,
                   p.audit_mask_iou)


def mask_iou(a: MaskRecord, b: MaskRecord) -> float:
    """IoU of two masks of one image (pycocotools on their RLE, no decode)."""
    ra = {"size": a.segmentation["size"], "counts": a.segmentation["counts"].encode("ascii")}
    rb = {"size": b.segmentation["size"], "counts": b.segmentation["counts"].encode("ascii")}
    return float(mask_utils.iou([ra], [rb], [0])[0][0])


def matched_iou(first: list[MaskRecord], second: list[MaskRecord]) -> float | None:
    """Mean IoU of the greedy best one-to-one matching of two annotators' masks of one phrase; a mask
    left unmatched counts 0. None when neither has a mask."""
    if not first and not second:
        return None
    if not first or not second:
        return 0.0
    ious = np.array([[mask_iou(a, b) for b in second] for a in first])
    total, used_rows, used_cols = 0.0, set(), set()
    for flat in np.argsort(-ious, axis=None):
        r, c = divmod(int(flat), ious.shape[1])
        if r in used_rows or c in used_cols:
            continue
        used_rows.add(r)
        used_cols.add(c)
        total += ious[r, c]
    return total / max(len(first), len(second))
