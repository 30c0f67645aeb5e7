"""The review desk: the human half of the orchestrator (claims with leases, submissions, audits,
annotator figures).

Queue order (``Item.queue_rank``): the review band (0.7 <= score < 0.9) lowest score first, then
the stage-2 fix queue (score < 0.7) lowest first, then audits, then stage-1 items. A claim is a
lease in the item's manifest (the truth) that expires ``lease_s`` after the last heartbeat; an
expired one goes back to the queue, and a submit on it is refused. An annotator holds one item at
a time: asking again hands back the one they hold.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from services.common.errors import FailedPrecondition, InvalidInput
from services.common.masks import MaskRecord
from services.common.metrics import LEASE_EXPIRIES, REVIEWS
from services.common.review import (AnnotatorFigures, Lease, ReviewRecord, ReviewSubmission,
                                    ReviewedPhrase, annotator_name, matched_iou)
from services.common.verdicts import Verdict
from services.orchestrator.index import Index
from services.orchestrator.model import Item, ItemState, PhraseResult, Stage

log = logging.getLogger(__name__)

CLAIM_WINDOW = 64  # free ids read (and filtered) per round trip while looking for a claimable one
CLAIM_GRACE_S = 30.0  # how long a claim in progress holds the item in the index


class Items(Protocol):
    """What the desk needs of the orchestrator."""

    index: Index

    def load(self, item_id: str) -> Item: ...
    def save(self, item: Item) -> None: ...


def audit_picked(item_id: str, rate: float) -> bool:
    """Deterministic draw (the same item is always picked or not at one rate): reproducible runs."""
    draw = int(hashlib.sha256(f"audit:{item_id}".encode()).hexdigest()[:8], 16) / 2 ** 32
    return draw < rate


def stamp_sources(item: Item, sub: ReviewSubmission, name: str) -> None:
    """Every submitted mask's ``source``, set here whatever the client sent: a model mask the
    annotator kept as it was keeps the machine's (``sam1:...``, ``sam3:...``, matched by its RLE in
    the phrase it was proposed for); one drawn or changed by the annotator is ``human:name``."""
    machine = {p.phrase: {m.segmentation["counts"]: m.source for m in p.masks}
               for p in item.phrases if not p.is_negative}
    for p in sub.phrases:
        made = machine.get(p.original_phrase, {}) if p.original_phrase else {}
        for m in p.masks:
            counts = m.mask.segmentation["counts"]
            m.mask.source = made[counts] if m.origin == "model" and counts in made else f"human:{name}"


def _machine_mask_scores(phrase: PhraseResult) -> dict[str, float]:
    """RLE counts -> the machine's MV score, for joining a human's decision to the mask it judged."""
    scores: dict[str, float] = {}
    for v in phrase.verdicts:
        if v.check == "mask":
            for i in v.mask_indices:
                if 0 <= i < len(phrase.masks):
                    scores[phrase.masks[i].segmentation["counts"]] = v.score
    return scores


def _ev_score(phrase: PhraseResult | None) -> float | None:
    if phrase is None:
        return None
    return next((v.score for v in phrase.verdicts if v.check == "exhaustivity"), None)


def review_event(item: Item, record: ReviewRecord) -> dict:
    """The index's line for one review: what annotator figures add up."""
    return {"item_id": item.item_id, "annotator": record.annotator, "kind": record.kind,
            "accept": record.accept, "seconds": record.seconds, "masks": record.masks,
            "submitted_at": record.submitted_at, "agreement": record.agreement,
            "audited": _audited(item, record)}


def _audited(item: Item, record: ReviewRecord) -> str:
    if record.kind != "audit":
        return ""
    first = next((r for r in item.reviews if r.kind == "review"), None)
    return first.annotator if first else ""


def put_review_events(index: Index, item: Item) -> None:
    """(Re)add every review of ``item`` to the annotator aggregates; idempotent (each review is
    counted once by its number), so a rebuild can call it again."""
    for i, record in enumerate(item.reviews):
        index.add_review(item.item_id, i, review_event(item, record))


@dataclass
class ReviewDesk:
    items: Items
    lease_s: float = 600.0
    audit_rate: float = 0.05
    clock: Callable[[], float] = field(default=time.time)

    @property
    def index(self) -> Index:
        return self.items.index

    # -- claims ----------------------------------------------------------------------------------

    def next(self, annotator: str, stage: Stage | None = None) -> Item | None:
        """Claim the next item for ``annotator`` (``item.lease`` is their lease), None when none waits.

        Reads the head of the free queue (per stage, merged by rank), never the whole queue: held
        items are not in it, and the ids the annotator skipped or may not audit are filtered a
        window at a time. Costs O(log n + the annotator's skips) in the queue's size n."""
        name = annotator_name(annotator)
        now = self.clock()
        self.index.requeue_expired(now)
        mine = self.index.claim_of(name)
        if mine:
            with self.index.lock(mine["item_id"]):
                item = self.items.load(mine["item_id"])
                if (item.band and item.lease and item.lease.annotator == name and item.lease.live(now)
                        and (stage is None or item.stage == stage)):
                    return item
        stages = [stage] if stage is not None else list(Stage)
        # Items this annotator skipped come last, in a second pass: skipping must not hand the
        # same item straight back.
        for second_pass in (False, True):
            for item_id in self._candidates(name, stages, second_pass):
                item = self._claim(item_id, name, stage, now, skipped_ok=second_pass)
                if item is not None:
                    return item
        if mine:
            self.index.set_claim(name, None)
        return None

    def _candidates(self, name: str, stages: list[Stage], skipped_ok: bool) -> Iterator[str]:
        """Free item ids in queue order, less those ``name`` skipped (unless ``skipped_ok``) or
        reviewed (an audit is never by its own reviewer)."""
        streams = [self._free_ids(s) for s in stages]
        window: list[str] = []
        for item_id, _ in heapq.merge(*streams, key=lambda e: (e[1], e[0])):
            window.append(item_id)
            if len(window) == CLAIM_WINDOW:
                yield from self._allowed(name, window, skipped_ok)
                window = []
        yield from self._allowed(name, window, skipped_ok)

    def _free_ids(self, stage: Stage) -> Iterator[tuple[str, float]]:
        offset = 0
        while True:
            chunk = self.index.free(stage, offset, CLAIM_WINDOW)
            yield from chunk
            if len(chunk) < CLAIM_WINDOW:
                return
            offset += len(chunk)

    def _allowed(self, name: str, window: list[str], skipped_ok: bool) -> list[str]:
        skipped, own = self.index.avoided(name, window)
        return [i for i in window if i not in own and (skipped_ok or i not in skipped)]

    def _claim(self, item_id: str, name: str, stage: Stage | None, now: float, skipped_ok: bool) -> Item | None:
        """Claim ``item_id`` for ``name`` if it is free for them; None otherwise. The index's
        ``take`` decides between racing claimers; the manifest decides whether the item may be
        claimed at all (a stale index entry is set back to the manifest's truth)."""
        # Held in the index for a short grace until the lease is written: a claimer that dies
        # here loses the item for seconds, not for a whole lease.
        if not self.index.take(item_id, now + min(self.lease_s, CLAIM_GRACE_S)):
            return None
        with self.index.lock(item_id):
            item = self.items.load(item_id)
            refused = (not item.band or (stage is not None and item.stage != stage)
                       or (item.lease is not None and item.lease.live(now) and item.lease.annotator != name)
                       or (item.band == "audit" and item.reviewer == name)  # nobody audits their own work
                       or (name in item.skipped_by and not skipped_ok))
            if refused:
                self.index.put(item)
                return None
            if item.lease and item.lease.annotator != name:
                LEASE_EXPIRIES.inc()
                log.info("lease expired: item handed over", extra={
                    "key": f"{item_id} from {item.lease.annotator} to {name}"})
            item.lease = Lease(item_id, name, secrets.token_hex(16), now, now + self.lease_s)
            self.items.save(item)
            self.index.set_claim(name, {"item_id": item_id, "band": item.band, "expires_at": item.lease.expires_at})
            return item

    def _held(self, item: Item, annotator: str, token: str, now: float) -> Lease:
        """The caller's live lease on ``item``; FAILED_PRECONDITION naming why it is not."""
        lease = item.lease
        if not token:
            raise InvalidInput("lease_token is empty: claim the item with NextReview first")
        if lease is None or lease.token != token:
            if lease is not None and lease.annotator != annotator and lease.live(now):
                raise FailedPrecondition(f"item {item.item_id} is now held by {lease.annotator!r}: your lease "
                                         "expired or was never yours; your work was not saved there")
            raise FailedPrecondition(f"your lease on item {item.item_id} is gone (expired and handed over, "
                                     "released, or already submitted)")
        if lease.annotator != annotator:
            raise FailedPrecondition(f"the lease on item {item.item_id} belongs to {lease.annotator!r}")
        if not lease.live(now):
            raise FailedPrecondition(f"your lease on item {item.item_id} expired {now - lease.expires_at:.0f} s "
                                     f"ago (no heartbeat for {self.lease_s:g} s); claim the item again")
        return lease

    def heartbeat(self, item_id: str, annotator: str, token: str) -> Lease:
        name = annotator_name(annotator)
        with self.index.lock(item_id):
            item = self.items.load(item_id)
            now = self.clock()
            lease = self._held(item, name, token, now)
            lease.expires_at = now + self.lease_s
            self.items.save(item)
            self.index.set_claim(name, {"item_id": item_id, "band": item.band, "expires_at": lease.expires_at})
            return lease

    def release(self, item_id: str, annotator: str, token: str) -> Item:
        """The annotator skips the item: it goes back to the queue."""
        name = annotator_name(annotator)
        with self.index.lock(item_id):
            item = self.items.load(item_id)
            self._held(item, name, token, self.clock())
            item.lease = None
            if name not in item.skipped_by:
                item.skipped_by.append(name)
            self.items.save(item)
            self.index.set_claim(name, None)
            return item

    # -- submissions -----------------------------------------------------------------------------

    def submit(self, sub: ReviewSubmission) -> Item:
        """Apply a human's review (or audit) of an item they hold."""
        name = annotator_name(sub.annotator)
        with self.index.lock(sub.item_id):
            item = self.items.load(sub.item_id)
            now = self.clock()
            lease = self._held(item, name, sub.lease_token, now)
            if not item.band:
                raise FailedPrecondition(f"item {item.item_id} is {item.state.name.lower()}, not waiting for review")
            if not (item.height and item.width):
                raise FailedPrecondition(f"item {item.item_id} has no image size yet (not embedded)")
            sub.checked((item.height, item.width))
            stamp_sources(item, sub, name)
            record = self._record(item, sub, name, lease, now)
            if item.band == "audit":
                record.kind = "audit"
                record.phrases = [_phrase_json(p) for p in sub.phrases]
                record.agreement = agreement(item, sub)
                item.audit = "done"
            else:
                if sub.accept:
                    item.phrases = [_human_phrase(p, name) for p in sub.phrases if not p.ungroundable]
                item.reviewer = name
                item.move(ItemState.ACCEPTED if sub.accept else ItemState.DISCARDED, f"reviewed by {name}")
                if sub.accept and audit_picked(item.item_id, self.audit_rate):
                    item.audit = "pending"
            item.lease = None
            item.reviews.append(record)
            self.items.save(item)
            self.index.set_claim(name, None)
            self.index.add_review(item.item_id, len(item.reviews) - 1, review_event(item, record))
        REVIEWS.labels(record.kind, "accept" if sub.accept else "discard").inc()
        return item

    def _record(self, item: Item, sub: ReviewSubmission, name: str, lease: Lease, now: float) -> ReviewRecord:
        machine = {(p.phrase, p.is_negative): p for p in item.phrases}
        record = ReviewRecord(annotator=name, kind="review", accept=sub.accept, claimed_at=lease.claimed_at,
                              submitted_at=round(now, 3), seconds=round(max(0.0, now - lease.claimed_at), 3),
                              client_seconds=sub.seconds_spent)
        for p in sub.phrases:
            proposed = machine.get((p.original_phrase, False)) if p.original_phrase else None
            scores = _machine_mask_scores(proposed) if proposed else {}
            for m in p.masks:
                model_score = scores.get(m.mask.segmentation["counts"]) if m.origin == "model" else None
                record.mv.append({"phrase": p.phrase, "original_phrase": p.original_phrase,
                                  "mask": m.mask.to_json(), "accept": m.accept, "origin": m.origin,
                                  "model_score": model_score})
            if p.exhaustive is not None or p.ungroundable:
                record.ev.append({"phrase": p.phrase, "exhaustive": p.exhaustive, "ungroundable": p.ungroundable,
                                  "model_score": _ev_score(proposed)})
            if p.negative_check:
                record.negatives.append({"phrase": p.phrase, "check": p.negative_check})
            if sub.accept and not p.is_negative and not p.ungroundable:
                record.masks += len(p.kept)  # a discarded image's masks are no work for the dataset
        return record

    # -- figures ---------------------------------------------------------------------------------

    def waiting(self) -> dict[str, int]:
        """Queued items nobody holds a live lease on, per band (QUEUE_BANDS): O(log n)."""
        self.index.requeue_expired(self.clock())
        return self.index.waiting()

    def oldest_waiting_s(self) -> float:
        """Seconds the longest-waiting unclaimed item has been in the review queue; 0 when none waits."""
        now = self.clock()
        self.index.requeue_expired(now)
        since = self.index.oldest_free()
        return 0.0 if since is None else max(0.0, now - since)

    def figures(self) -> list[AnnotatorFigures]:
        """Per annotator: reviews, masks and seconds (claim to submit), and the audits of their
        work, from the aggregates each review adds to (O(annotators), not O(reviews))."""
        figures = []
        for name, t in self.index.annotator_totals().items():
            f = AnnotatorFigures(name, items=int(t.get("items", 0)), masks=int(t.get("masks", 0)),
                                 seconds=float(t.get("seconds", 0.0)), audits=int(t.get("audits", 0)))
            if f.audits:
                f.audit_decision_agreement = t.get("decision_sum", 0.0) / f.audits
                f.audit_mask_iou = t.get("iou_sum", 0.0) / f.audits
            figures.append(f)
        return sorted(figures, key=lambda f: f.annotator)


def _human_phrase(p: ReviewedPhrase, name: str) -> PhraseResult:
    """The dataset's pair from a human's phrase: kept masks only, decisions as verdicts by ``human:name``."""
    source = f"human:{name}"
    kept = [] if p.is_negative else p.kept
    verdicts = [Verdict("mask", "accept", 1.0, source, p.phrase, [i]) for i in range(len(kept))]
    if p.exhaustive is not None:
        verdicts.append(Verdict("exhaustivity", "accept" if p.exhaustive else "reject",
                                1.0 if p.exhaustive else 0.0, source, p.phrase, list(range(len(kept)))))
    if p.is_negative:
        verdicts.append(Verdict("hard_negative", "absent", 1.0, source, p.phrase))
    return PhraseResult(phrase=p.phrase, is_negative=p.is_negative, masks=kept, verdicts=verdicts, score=1.0,
                        provenance=source, state=ItemState.ACCEPTED, grounded=bool(kept), exhaustive=p.exhaustive)


def _phrase_json(p: ReviewedPhrase) -> dict:
    return {"phrase": p.phrase, "is_negative": p.is_negative, "exhaustive": p.exhaustive,
            "ungroundable": p.ungroundable, "masks": [m.mask.to_json() for m in p.masks if m.accept]}


def agreement(item: Item, audit: ReviewSubmission) -> dict[str, float]:
    """How an auditor's submission agrees with the accepted review in ``item``.

    decision: the share of decisions both made alike: accept/discard, each phrase kept or not
    (positive or negative), and each shared phrase's exhaustivity where both decided it.
    mask_iou: the mean over positive phrases of either of their matched-mask IoU (a phrase only one
    kept counts 0); 1.0 when neither masked anything.
    """
    first = {(p.phrase, p.is_negative): p for p in item.phrases}
    second = {(p.phrase, p.is_negative): p for p in audit.phrases if not p.ungroundable}
    agreed, total = int(audit.accept), 1
    for key in first.keys() | second.keys():
        total += 1
        agreed += key in first and key in second
        a, b = first.get(key), second.get(key)
        if a is not None and b is not None and a.exhaustive is not None and b.exhaustive is not None:
            total += 1
            agreed += a.exhaustive == b.exhaustive
    ious = []
    for key in first.keys() | second.keys():
        if key[1]:
            continue
        a_masks: list[MaskRecord] = first[key].masks if key in first else []
        b_masks: list[MaskRecord] = second[key].kept if key in second else []
        value = matched_iou(a_masks, b_masks)
        if value is not None:
            ious.append(value)
    return {"decision": agreed / total, "mask_iou": sum(ious) / len(ious) if ious else 1.0}
