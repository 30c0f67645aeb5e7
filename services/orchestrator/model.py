"""The item model: one image through the stages, its state machine, and its manifest (JSON).

The manifest in the object store (``manifest_key(item_id)``) is the source of truth; Redis only
indexes it. Everything here is plain data with ``to_json``/``from_json`` and ``to_proto``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from enum import IntEnum

from services.common.keys import manifest_key, step_key  # noqa: F401 (re-exported)
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.failure_modes import MiningRecord
from services.common.masks import MaskRecord
from services.common.review import Lease, ReviewRecord
from services.common.verdicts import Verdict
from services.common.pb import orchestrator_pb2


class Stage(IntEnum):
    """The three stages of ARCHITECTURE.md (values are the proto enum's)."""

    UNSPECIFIED = 0
    ASSISTED_MANUAL = 1
    SEMI_AUTOMATIC = 2
    FULLY_AUTOMATIC = 3

    @classmethod
    def parse(cls, value: "Stage | int | str") -> "Stage":
        """A stage from its number, its name (``fully_automatic``) or its number as text ("3")."""
        try:
            if isinstance(value, str):
                text = value.strip().upper().replace("-", "_")
                stage = cls(int(text)) if text.isdigit() else cls[text.removeprefix("STAGE_")]
            else:
                stage = cls(int(value))
        except (KeyError, ValueError):
            raise InvalidInput(f"unknown stage {value!r}; use 1 assisted_manual, 2 semi_automatic or "
                               "3 fully_automatic") from None
        return cls.FULLY_AUTOMATIC if stage == cls.UNSPECIFIED else stage


class ItemState(IntEnum):
    """Item states (values are the proto enum's)."""

    UNSPECIFIED = 0
    INGESTED = 1
    EMBEDDED = 2
    CONCEPTS_PROPOSED = 3
    MASKS_DECODED = 4
    VERIFIED = 5
    ACCEPTED = 6
    REVIEW = 7
    REJECTED = 8
    DISCARDED = 9
    FAILED = 10

    @classmethod
    def parse(cls, value: "ItemState | int | str") -> "ItemState":
        try:
            if isinstance(value, str):
                text = value.strip().upper()
                return cls(int(text)) if text.isdigit() else cls[text.removeprefix("ITEM_STATE_")]
            return cls(int(value))
        except (KeyError, ValueError):
            raise InvalidInput(f"unknown item state {value!r}; one of "
                               f"{', '.join(s.name.lower() for s in cls if s)}") from None


S = ItemState
# Where each state may go next. EMBEDDED and CONCEPTS_PROPOSED run in parallel: whichever finishes
# second moves the item on from the first. FAILED is reachable from every non-terminal state.
TRANSITIONS: dict[ItemState, frozenset[ItemState]] = {
    S.INGESTED: frozenset({S.EMBEDDED, S.CONCEPTS_PROPOSED, S.REVIEW}),
    S.EMBEDDED: frozenset({S.CONCEPTS_PROPOSED, S.MASKS_DECODED, S.REVIEW}),
    S.CONCEPTS_PROPOSED: frozenset({S.EMBEDDED, S.MASKS_DECODED}),
    S.MASKS_DECODED: frozenset({S.VERIFIED}),
    S.VERIFIED: frozenset({S.ACCEPTED, S.REVIEW, S.REJECTED}),
    S.REVIEW: frozenset({S.ACCEPTED, S.DISCARDED}),
    S.REJECTED: frozenset({S.ACCEPTED, S.DISCARDED}),
    S.ACCEPTED: frozenset(),
    S.DISCARDED: frozenset(),
    S.FAILED: frozenset(),
}
TERMINAL = frozenset({S.ACCEPTED, S.DISCARDED, S.FAILED})
# States where the machine is done and a human may take over (the end of `dataengine run`).
SETTLED = TERMINAL | {S.REVIEW, S.REJECTED}

# Pipeline steps, each run by one service's worker and reported back to the orchestrator.
EMBED, PROPOSE, DECODE, VERIFY = "embed", "propose", "decode", "verify"
STEPS = (EMBED, PROPOSE, DECODE, VERIFY)

# The review queue's bands, in the order annotators get them (see Item.band).
QUEUE_BANDS = ("review", "fix", "audit", "stage1")


def item_id_for(source: str, image_id: str) -> str:
    """Deterministic id: the same file (source name and content) submitted twice is one item."""
    # surrogateescape: a source name carrying undecodable bytes still has one id, never a crash
    return hashlib.sha256(f"{source}\n{image_id}".encode("utf-8", "surrogateescape")).hexdigest()[:24]


@dataclass
class PhraseResult:
    """One image-noun-phrase pair, the unit of verification and routing.

    masks: the phrase's instances (empty for a hard negative, or for an image-level label that no
        backend could ground: ``grounded`` is False then).
    score: the verifier's score for the pair, in [0, 1].
    provenance: which model version or human produced it.
    exhaustive: a human's exhaustivity (EV) decision: every instance is masked (None: no human said).
    """

    phrase: str
    is_negative: bool = False
    masks: list[MaskRecord] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    score: float = 0.0
    provenance: str = ""
    state: ItemState = ItemState.UNSPECIFIED
    grounded: bool = False
    exhaustive: bool | None = None

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "is_negative": self.is_negative,
                "masks": [m.to_json() for m in self.masks], "verdicts": [v.to_json() for v in self.verdicts],
                "score": float(self.score), "provenance": self.provenance, "state": self.state.name,
                "grounded": self.grounded, "exhaustive": self.exhaustive}

    @classmethod
    def from_json(cls, d: dict) -> "PhraseResult":
        return cls(phrase=d["phrase"], is_negative=bool(d.get("is_negative", False)),
                   masks=[MaskRecord.from_json(m) for m in d.get("masks", [])],
                   verdicts=[Verdict.from_json(v) for v in d.get("verdicts", [])],
                   score=float(d.get("score", 0.0)), provenance=d.get("provenance", ""),
                   state=ItemState.parse(d.get("state", "UNSPECIFIED")), grounded=bool(d.get("grounded", False)),
                   exhaustive=d.get("exhaustive"))

    def to_proto(self) -> orchestrator_pb2.PhraseResult:
        p = orchestrator_pb2.PhraseResult(
            phrase=self.phrase, is_negative=self.is_negative, masks=[m.to_proto() for m in self.masks],
            verdicts=[v.to_proto() for v in self.verdicts], score=self.score, provenance=self.provenance,
            state=int(self.state), grounded=self.grounded)
        if self.exhaustive is not None:
            p.exhaustive = self.exhaustive
        return p

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.PhraseResult) -> "PhraseResult":
        if not p.phrase.strip():
            raise InvalidInput("a phrase result needs a non-empty phrase")
        return cls(phrase=p.phrase, is_negative=p.is_negative, masks=[MaskRecord.from_proto(m) for m in p.masks],
                   verdicts=[Verdict.from_proto(v) for v in p.verdicts], score=p.score,
                   provenance=p.provenance, state=ItemState.parse(p.state), grounded=bool(p.masks),
                   exhaustive=p.exhaustive if p.HasField("exhaustive") else None)


@dataclass
class Item:
    """One image through the engine.

    image_key: object key of the image bytes; image_id: their sha256; height, width: pixels
        (known once embedded). outputs: step name -> object key of its output.
    done: the steps whose report has been applied (a redelivered report is ignored).
    grid_masks_key: SA-1B JSON of the class-agnostic automatic masks.
    history: [state name, unix seconds] in order, for provenance and debugging.
    timings: step name -> seconds its handler ran (model and storage work, without queueing).
    lease: the annotator's claim while one holds it. reviews: every human review and audit, in order.
    audit: "" (none), "pending" (a second annotator is to check the accepted review) or "done".
    skipped_by: annotators who skipped it: they get it again only when nothing else waits.
    models: the models that made the item's machine output: "encoder" (the encoder id its
        embeddings carry) and "decoder" (the decoder id of its masks), set as the steps report.
    failure_modes: why the item needs a human (``failure_modes.FAILURE_MODES``), set when it is
        routed to review or the fix queue. priority: the urgency in [0, 1] they and the score give it
        (``MiningPolicy.urgency``), which orders it in its band; None: by score alone.
    mining: one record per routing by the verifier, kept across reruns (``dataengine mining``).
    amg_params: the grid-mask parameters (``AmgParams`` fields) its embed and decode steps run with,
        fixed when it is submitted, so a resume or rerun under other settings still decodes the crops
        it embedded; None (a manifest of an older version): the orchestrator's.
    """

    item_id: str
    source: str
    image_key: str
    image_id: str
    stage: Stage = Stage.FULLY_AUTOMATIC
    state: ItemState = ItemState.INGESTED
    reason: str = ""
    known_labels: list[str] = field(default_factory=list)
    height: int = 0
    width: int = 0
    outputs: dict[str, str] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    phrases: list[PhraseResult] = field(default_factory=list)
    grid_masks_key: str = ""
    score: float | None = None
    history: list[list] = field(default_factory=list)
    reviewer: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    lease: Lease | None = None
    reviews: list[ReviewRecord] = field(default_factory=list)
    audit: str = ""
    skipped_by: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    failure_modes: list[str] = field(default_factory=list)
    priority: float | None = None
    mining: list[MiningRecord] = field(default_factory=list)
    amg_params: dict | None = None

    def __post_init__(self) -> None:
        if not self.history:
            self.history = [[self.state.name, round(time.time(), 3)]]

    @property
    def settled(self) -> bool:
        return self.state in SETTLED

    def move(self, new: ItemState, reason: str = "") -> None:
        """Change state along TRANSITIONS (or to FAILED from any non-terminal state)."""
        if new == self.state:
            return
        allowed = self.state not in TERMINAL and (new == ItemState.FAILED or new in TRANSITIONS[self.state])
        if not allowed:
            raise FailedPrecondition(f"item {self.item_id} cannot go from {self.state.name.lower()} "
                                     f"to {new.name.lower()}")
        self.state, self.reason = new, reason
        self.history.append([new.name, round(time.time(), 3)])

    def fail(self, reason: str) -> None:
        self.move(ItemState.FAILED, reason)

    def rerun_refusal(self, now: float) -> str:
        """Why ``rerun`` may not touch this item ("" when it may): only machine-routed items that
        wait for a human (review or the fix queue) with masks to redo, none a human settled or holds."""
        if self.state not in (ItemState.REVIEW, ItemState.REJECTED):
            return f"{self.state.name.lower()}, not waiting in review or the fix queue"
        if self.stage == Stage.ASSISTED_MANUAL or DECODE not in self.done:
            return "assisted-manual: no machine masks to redo"
        if self.reviews or self.reviewer:
            return "a human reviewed it"
        if self.lease is not None and self.lease.live(now):
            return f"{self.lease.annotator} is reviewing it"
        return ""

    def rerun(self, reason: str, now: float) -> None:
        """Send the item back to before its decode step (its embedding and concepts stay): the decode
        and verify steps run again and route it anew. The only way back from review or the fix
        queue, so it is not in TRANSITIONS; FailedPrecondition when ``rerun_refusal`` says why not."""
        refusal = self.rerun_refusal(now)
        if refusal:
            raise FailedPrecondition(f"item {self.item_id} cannot be rerun: {refusal}")
        self.done = [s for s in self.done if s not in (DECODE, VERIFY)]
        for step in (DECODE, VERIFY):
            self.outputs.pop(step, None)
            self.timings.pop(step, None)
        self.grid_masks_key, self.phrases, self.score, self.lease = "", [], None, None
        self.failure_modes, self.priority = [], None
        self.models.pop("decoder", None)
        self.state, self.reason = ItemState.EMBEDDED, reason
        self.history.append([ItemState.EMBEDDED.name, round(now, 3)])

    @property
    def band(self) -> str:
        """The review-queue band: "review" (0.7 <= score < 0.9), "fix" (below), "audit" (a human's
        accepted review for a second annotator), "stage1" (assisted-manual, no masks) or ""."""
        if self.state == ItemState.REVIEW:
            return "stage1" if self.stage == Stage.ASSISTED_MANUAL or self.score is None else "review"
        if self.state == ItemState.REJECTED:
            return "fix"
        if self.state == ItemState.ACCEPTED and self.audit == "pending":
            return "audit"
        return ""

    @property
    def queue_rank(self) -> float | None:
        """Where the item stands in the review queue (lower first), None when not queued: the bands
        in the order of QUEUE_BANDS, each most urgent first (``priority``; without one, lowest
        verifier score first). A band's ranks stay in [2 * its index, 2 * its index + 1]."""
        band = self.band
        if not band:
            return None
        if self.priority is not None and band in ("review", "fix"):
            return QUEUE_BANDS.index(band) * 2 + 1.0 - min(1.0, max(0.0, self.priority))
        score = min(1.0, max(0.0, self.score)) if self.score is not None else 0.0
        return QUEUE_BANDS.index(band) * 2 + score

    @property
    def queued_at(self) -> float:
        """Unix seconds since the item waits for a human: when it entered its present state (an
        audit waits from its acceptance)."""
        return float(self.history[-1][1]) if self.history else 0.0

    def to_json(self) -> dict:
        return {"item_id": self.item_id, "source": self.source, "image_key": self.image_key,
                "image_id": self.image_id, "stage": self.stage.name, "state": self.state.name,
                "reason": self.reason, "known_labels": list(self.known_labels), "height": self.height,
                "width": self.width, "outputs": dict(self.outputs), "done": list(self.done),
                "phrases": [p.to_json() for p in self.phrases], "grid_masks_key": self.grid_masks_key,
                "score": self.score, "history": self.history, "reviewer": self.reviewer,
                "timings": dict(self.timings), "lease": self.lease.to_json() if self.lease else None,
                "reviews": [r.to_json() for r in self.reviews], "audit": self.audit,
                "skipped_by": list(self.skipped_by), "models": dict(self.models),
                "failure_modes": list(self.failure_modes), "priority": self.priority,
                "mining": [r.to_json() for r in self.mining], "amg_params": self.amg_params}

    @classmethod
    def from_json(cls, d: dict) -> "Item":
        try:
            return cls(item_id=d["item_id"], source=d["source"], image_key=d["image_key"], image_id=d["image_id"],
                       stage=Stage[d["stage"]], state=ItemState[d["state"]], reason=d.get("reason", ""),
                       known_labels=list(d.get("known_labels", [])), height=int(d.get("height", 0)),
                       width=int(d.get("width", 0)), outputs=dict(d.get("outputs", {})),
                       done=list(d.get("done", [])),
                       phrases=[PhraseResult.from_json(p) for p in d.get("phrases", [])],
                       grid_masks_key=d.get("grid_masks_key", ""), score=d.get("score"),
                       history=list(d.get("history", [])), reviewer=d.get("reviewer", ""),
                       timings={str(k): float(v) for k, v in d.get("timings", {}).items()},
                       lease=Lease.from_json(d["lease"]) if d.get("lease") else None,
                       reviews=[ReviewRecord.from_json(r) for r in d.get("reviews", [])],
                       audit=str(d.get("audit", "")), skipped_by=[str(a) for a in d.get("skipped_by", [])],
                       models={str(k): str(v) for k, v in d.get("models", {}).items()},
                       failure_modes=[str(m) for m in d.get("failure_modes", [])],
                       priority=None if d.get("priority") is None else float(d["priority"]),
                       mining=[MiningRecord.from_json(r) for r in d.get("mining", [])],
                       amg_params=None if d.get("amg_params") is None else dict(d["amg_params"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed item manifest {d.get('item_id', '?')!r}: {exc!r}") from None

    def to_proto(self, grid_masks: list[MaskRecord] | None = None, lease: Lease | None = None) -> orchestrator_pb2.Item:
        """grid_masks: the class-agnostic masks, read from ``grid_masks_key`` by the caller.
        lease: the caller's own claim, to hand to it (a lease's token is shown to its holder only)."""
        return orchestrator_pb2.Item(
            item_id=self.item_id, source=self.source, stage=int(self.stage), state=int(self.state),
            reason=self.reason, phrases=[p.to_proto() for p in self.phrases],
            grid_masks=[m.to_proto() for m in grid_masks or []],
            score=self.score if self.score is not None else 0.0, image_key=self.image_key,
            embedding_key=self.outputs.get(EMBED, ""), height=self.height, width=self.width,
            lease=lease.to_proto() if lease else None, band=self.band,
            audit_of=self.reviewer if self.band == "audit" else "", reviewer=self.reviewer,
            models=self.models, failure_modes=self.failure_modes)


def _counts(d: dict[str, int]) -> list[orchestrator_pb2.CountByKey]:
    return [orchestrator_pb2.CountByKey(key=k, count=v) for k, v in sorted(d.items())]


@dataclass
class Stats:
    """The engine at a glance: items per state and per stage, messages per queue (ready +
    unacknowledged), dead letters, unclaimed review-queue items per band, and how long the oldest
    of them has waited (seconds; 0 when none waits)."""

    by_state: dict[str, int]
    by_stage: dict[str, int]
    queue_depths: dict[str, int]
    dead_letters: int
    review_waiting: dict[str, int] = field(default_factory=dict)
    review_oldest_s: float = 0.0

    def to_json(self) -> dict:
        return {"items_by_state": self.by_state, "items_by_stage": self.by_stage,
                "queue_depths": self.queue_depths, "dead_letters": self.dead_letters,
                "review_waiting": self.review_waiting, "review_oldest_s": self.review_oldest_s}

    def to_proto(self) -> orchestrator_pb2.StatsResponse:
        return orchestrator_pb2.StatsResponse(
            items_by_state=_counts(self.by_state), items_by_stage=_counts(self.by_stage),
            queue_depths=_counts(self.queue_depths), dead_letters=self.dead_letters,
            review_waiting=_counts(self.review_waiting), review_oldest_seconds=self.review_oldest_s)

    @classmethod
    def from_proto(cls, p: orchestrator_pb2.StatsResponse) -> "Stats":
        def counts(rows) -> dict[str, int]:
            return {c.key: c.count for c in rows}

        return cls(counts(p.items_by_state), counts(p.items_by_stage), counts(p.queue_depths), p.dead_letters,
                   counts(p.review_waiting), p.review_oldest_seconds)
