"""The orchestrator's core: submit items, apply step reports, decide every next step.

Flow of one item (stage 3, fully automatic):

    submit -> INGESTED --embed--> EMBEDDED ----\\
                      --propose-> CONCEPTS_PROPOSED --(both done)--> decode -> MASKS_DECODED
           -> verify -> VERIFIED -> ACCEPTED | REVIEW | REJECTED (routing.Thresholds)

Stage 1 (assisted-manual) items are embedded and then wait in REVIEW for an annotator; stage 2
(semi-automatic) items run the whole pipeline but are never accepted without a human.

Every report is applied under the item's lock: load the manifest, ignore the report if the step
was already applied (a redelivery after a worker died) or the item is settled, apply, save the
manifest, update the index, then dispatch what comes next. ``pending_steps`` is computed from the
manifest alone, so ``resume`` can re-dispatch whatever an interrupted run left unfinished.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

from services.common import keys
from services.common.decoded import DecodeOutput
from services.common.errors import InvalidInput, NotFound
from services.common.failure_modes import MiningPolicy, MiningRecord
from services.common.image_source import ImageSource
from services.common.limits import Limits
from services.common.masks import MaskRecord
from services.common.read_ahead import read_ahead
from services.common.metrics import FAILURE_MODES_FOUND, ITEMS_SETTLED
from services.common.steps import StepReport, StepRequest
from services.common.storage import ObjectStore, check_key
from services.common.verdicts import Verification
from services.common.review import ReviewSubmission
from services.common.settings import Settings
from services.orchestrator.cursor import make_token, read_token
from services.orchestrator.index import Index, now
from services.orchestrator.maintenance import Maintenance, RerunSummary, positives  # noqa: F401 - RerunSummary re-exported
from services.orchestrator.mining import assess
from services.orchestrator.model import (DECODE, EMBED, PROPOSE, VERIFY, Item, ItemState, PhraseResult, Stage, Stats,
                                         item_id_for, manifest_key)
from services.orchestrator.review import ReviewDesk
from services.orchestrator.routing import Thresholds

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000


class Dispatcher(Protocol):
    def send(self, request: StepRequest) -> None: ...


@dataclass
class Orchestrator(Maintenance):
    store: ObjectStore
    index: Index
    dispatcher: Dispatcher
    thresholds: Thresholds = field(default_factory=Thresholds)
    amg_params: dict = field(default_factory=dict)  # AmgParams fields for embed and decode
    queue_depths: Callable[[], dict[str, int]] = dict  # per queue: ready + unacknowledged
    lease_s: float = 600.0  # a review claim without a heartbeat this long goes back to the queue
    audit_rate: float = 0.05  # share of human-accepted items a second annotator checks
    limits: Limits = field(default_factory=Limits)  # what a caller may send (Limits.from_settings)
    mining: MiningPolicy = field(default_factory=MiningPolicy)  # failure modes and queue priority
    page_token_max_age_s: float = 86400.0  # a ListItems token older than this is refused (stale)
    read_workers: int = 16  # manifests read at once by the admin walks (rebuild, rerun)

    def __post_init__(self) -> None:
        self.desk = ReviewDesk(self, self.lease_s, self.audit_rate)

    @classmethod
    def from_settings(cls, settings: Settings, store: ObjectStore, index: Index, dispatcher: Dispatcher,
                      **more) -> "Orchestrator":
        """The orchestrator the settings describe (thresholds, AMG parameters, review lease and
        audit, input limits, mining) over these parts; ``more``: other fields (``queue_depths``)."""
        return cls(store, index, dispatcher, Thresholds(settings.accept_threshold, settings.review_threshold),
                   dict(settings.amg_params), lease_s=settings.review_lease_s, audit_rate=settings.audit_rate,
                   limits=Limits.from_settings(settings), mining=MiningPolicy.from_settings(settings),
                   page_token_max_age_s=settings.page_token_max_age_s, **more)

    # -- items -----------------------------------------------------------------------------------

    def load(self, item_id: str) -> Item:
        self.limits.check_id(item_id, "item id")  # before any echo of it
        try:
            data = self.store.get(manifest_key(item_id))
        except InvalidInput:
            raise InvalidInput(f"bad item id {item_id!r}") from None
        except NotFound:
            raise NotFound(f"item {item_id!r} not found") from None
        try:
            return Item.from_json(json.loads(data))
        except ValueError as exc:
            raise InvalidInput(f"manifest of item {item_id!r} is unreadable: {exc}") from None

    def save(self, item: Item) -> None:
        """Manifest first (the truth), then the index (rebuildable from manifests)."""
        self.store.put(manifest_key(item.item_id), json.dumps(item.to_json()).encode(),
                       content_type="application/json")
        self.index.put(item)

    def grid_masks(self, item: Item) -> list[MaskRecord]:
        if not item.grid_masks_key:
            return []
        doc = json.loads(self.store.get(item.grid_masks_key))
        return [MaskRecord.from_json(a) for a in doc.get("annotations", [])]

    # -- submit ----------------------------------------------------------------------------------

    def submit(self, images: Sequence[ImageSource], known_labels: Sequence[str] = (),
               stage: Stage = Stage.FULLY_AUTOMATIC) -> list[str]:
        """Ingest ``images`` and start them; returns their item ids in order.

        The same file (source and content) submitted again is the same item: it is not started
        twice. Images are checked when embedded: a bad one fails its item with the reason.
        """
        if not images:
            raise InvalidInput("no images to submit")
        labels = [label.strip() for label in self.limits.check_labels(known_labels)]
        stage = Stage.parse(stage)
        # Check every image before storing any: a refused request ingests nothing.
        for i, image in enumerate(images):
            if image.data is not None and not image.data:
                raise InvalidInput(f"image {i} ({image.filename or 'inline'}) is empty (0 bytes)")
            if image.key is not None and not self.store.exists(check_key(image.key)):
                raise NotFound(f"image {i}: object {image.key!r} not found")
        ids = []
        for image in images:
            if image.data is not None:
                content_id = keys.sha256_hex(image.data)
                image_key = keys.image_key(content_id)
                if not self.store.exists(image_key):
                    self.store.put(image_key, image.data)
            else:
                image_key = content_id = check_key(image.key)
            source = image.filename or (image.key if image.key else "inline")
            item_id = item_id_for(source, content_id)
            ids.append(item_id)
            try:
                self._resubmitted(self.load(item_id))
                continue  # already submitted: one item per file
            except NotFound:
                pass
            item = Item(item_id=item_id, source=source, image_key=image_key, image_id=content_id,
                        stage=stage, known_labels=labels, amg_params=dict(self.amg_params))
            self.save(item)
            self._dispatch(item)
        return ids

    def _resubmitted(self, item: Item) -> None:
        """A file submitted again: finish what an interrupted Submit left undone (the manifest
        written, then the index or the dispatch cut off): index it, and send its pending steps
        that are not known to be in flight. Costs O(1) in the store's size."""
        self.index.put(item)
        for request in self.pending_steps(item):
            if self.index.tracked(request.item_id, request.step) is None:
                self.send(request)

    # -- reports ---------------------------------------------------------------------------------

    def report(self, report: StepReport) -> Item | None:
        """Apply a step's report and dispatch what comes next. Returns the item (None if unknown)."""
        with self.index.lock(report.item_id):
            try:
                item = self.load(report.item_id)
            except (NotFound, InvalidInput) as exc:
                log.warning("report for an unknown item dropped: %s", exc)
                return None
            self.index.untrack(report.item_id, report.step)
            if item.settled or report.step in item.done:
                # Applied before (a redelivery): whoever applied it may have died between the
                # manifest and the index, so the index is set to the manifest again; and what the
                # step enables is dispatched again, in case it died before dispatching.
                self.index.put(item)
                if not item.settled:
                    for request in self._enabled_by(item, report.step):
                        self.send(request)
                return item
            if report.dead_letter:
                self.index.add_dead_letter({"item_id": item.item_id, "step": report.step,
                                            "reason": report.outcome.reason, "attempts": report.attempts,
                                            "at": now()})
            item.timings[report.step] = report.elapsed_s
            if not report.outcome.ok:
                item.fail(f"{report.step}: {report.outcome.reason}")
            else:
                try:
                    self._apply(item, report.step, report.outcome.outputs)
                except (InvalidInput, NotFound) as exc:  # a step's output we cannot use or find
                    item.fail(f"{report.step}: {exc}")
            self.save(item)
            if item.settled:
                ITEMS_SETTLED.labels(item.state.name.lower()).inc()
            next_steps = self._enabled_by(item, report.step)
        for request in next_steps:
            self.send(request)
        return item

    def _apply(self, item: Item, step: str, out: dict) -> None:
        item.done.append(step)
        if step == EMBED:
            item.outputs[EMBED] = _need(out, "embedding_key", str)
            item.image_id = _need(out, "image_id", str)
            item.height, item.width = _need(out, "height", int), _need(out, "width", int)
            item.models["encoder"] = _model_id(out, "encoder_id", "model_id")
            if item.stage == Stage.ASSISTED_MANUAL:
                item.move(ItemState.REVIEW, "assisted-manual: waiting for an annotator")
            else:
                item.move(ItemState.EMBEDDED)
        elif step == PROPOSE:
            item.outputs[PROPOSE] = _need(out, "concepts_key", str)
            item.move(ItemState.CONCEPTS_PROPOSED)
        elif step == DECODE:
            item.outputs[DECODE] = _need(out, "decode_key", str)
            item.grid_masks_key = _need(out, "masks_key", str)
            item.models["decoder"] = _model_id(out, "decoder_id")
            item.models["encoder"] = _model_id(out, "encoder_id") or item.models.get("encoder", "")
            item.move(ItemState.MASKS_DECODED)
        elif step == VERIFY:
            item.outputs[VERIFY] = _need(out, "verify_key", str)
            self._apply_verification(item)
        else:
            raise InvalidInput(f"unknown step {step!r}")

    def _apply_verification(self, item: Item) -> None:
        decoded = DecodeOutput.from_bytes(self.store.get(item.outputs[DECODE]), item.outputs[DECODE])
        verification = Verification.from_json(json.loads(self.store.get(item.outputs[VERIFY])))
        pairs = {(p.phrase, p.is_negative): p for p in verification.pairs}
        item.phrases = []
        for phrase in decoded.phrases:
            pair = pairs.get((phrase.phrase, phrase.is_negative))
            score = pair.score if pair is not None else verification.score
            item.phrases.append(PhraseResult(
                phrase=phrase.phrase, is_negative=phrase.is_negative, masks=phrase.masks,
                verdicts=list(pair.verdicts) if pair is not None else [], score=score,
                provenance=phrase.source, state=self.thresholds.route(score, item.stage),
                grounded=phrase.grounded))
        item.score = verification.score
        item.move(ItemState.VERIFIED)
        state = self.thresholds.route(verification.score, item.stage)
        reason = "" if state == ItemState.ACCEPTED else (
            f"verifier score {verification.score:.3f} "
            + ("below review threshold" if state == ItemState.REJECTED else "needs a human check"))
        item.move(state, reason)
        self._mine(item, decoded.grid_count)

    def _mine(self, item: Item, grid_count: int | None) -> None:
        """Count the item's phrases into the store's phrase sets and, when it goes to a human, give
        it its failure modes and queue priority; every routing is kept in ``item.mining``.
        grid_count: the decode output's grid masks (None, from an older decoder: read the grid)."""
        phrases = positives(item)
        self.index.put_phrases(item.item_id, phrases)
        if item.state in (ItemState.REVIEW, ItemState.REJECTED):
            if grid_count is None:
                grid_count = len(self.grid_masks(item))
            record = assess(item, self.mining, grid_count, self.index.carriers(phrases), now())
            item.failure_modes = record.modes
            for mode in record.modes:
                FAILURE_MODES_FOUND.labels(mode).inc()
            item.priority = round(self.mining.urgency(item.score or 0.0, record.modes), 6)
        else:  # accepted: nothing for a human to mine, but it counts among the decoder's routings
            record = MiningRecord(item.models.get("decoder", ""), now(), item.state.name)
        item.mining.append(record)

    # -- what next -------------------------------------------------------------------------------

    def pending_steps(self, item: Item) -> list[StepRequest]:
        """The steps the item needs now, from its manifest alone."""
        if item.settled:
            return []
        done, out = set(item.done), item.outputs
        params = item.amg_params if item.amg_params is not None else self.amg_params
        requests = []
        if EMBED not in done:
            requests.append(StepRequest(item.item_id, EMBED, {"image_key": item.image_key, "source": item.source,
                                                                "amg_params": params}))
        if PROPOSE not in done and item.stage != Stage.ASSISTED_MANUAL:
            requests.append(StepRequest(item.item_id, PROPOSE, {"image_key": item.image_key, "source": item.source,
                                                                 "known_labels": item.known_labels}))
        if {EMBED, PROPOSE} <= done and DECODE not in done:
            requests.append(StepRequest(item.item_id, DECODE, {"embedding_key": out[EMBED],
                                                                "concepts_key": out[PROPOSE], "amg_params": params}))
        if DECODE in done and VERIFY not in done:
            requests.append(StepRequest(item.item_id, VERIFY, {"decode_key": out[DECODE],
                                                                "concepts_key": out[PROPOSE],
                                                                "image_key": item.image_key}))
        return requests

    def _enabled_by(self, item: Item, step: str) -> list[StepRequest]:
        """The steps pending now that were not pending before ``step`` was done: what to send
        after its report (the other pending steps are already in flight)."""
        before = {r.step for r in self.pending_steps(replace(item, done=[s for s in item.done if s != step]))}
        return [r for r in self.pending_steps(item) if r.step not in before]

    def _dispatch(self, item: Item) -> None:
        for request in self.pending_steps(item):
            self.send(request)

    def send(self, request: StepRequest) -> None:
        """Dispatch one step, tracked first (by its send time) so that the sweep finds it if its
        message or its report is lost (services/orchestrator/sweep.py)."""
        request.sent_at = now()
        self.index.track(request.item_id, request.step, request.sent_at)
        self.dispatcher.send(request)

    # -- queries ---------------------------------------------------------------------------------

    def list_items(self, state: ItemState | None = None, stage: Stage | None = None, page_size: int = 100,
                   token: str = "") -> tuple[list[Item], str]:
        """One page of items in id order, and the token of the next ("" at the end): O(page).
        The token encodes the position and the filter, signed (cursor.py): a forged, foreign or
        stale one is refused by its form, not found by a scan."""
        if not 0 < page_size <= MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size must be in [1, {MAX_PAGE_SIZE}], got {page_size}")
        listing = f"state={state.name if state else ''};stage={stage.name if stage else ''}"
        after = read_token(self.index.secret(), token, listing, self.page_token_max_age_s) if token else ""
        chosen = self.index.page(state, stage, after, page_size + 1)
        more = len(chosen) > page_size
        chosen = chosen[:page_size]
        next_token = make_token(self.index.secret(), chosen[-1], listing) if more else ""
        # Manifests read concurrently: against an object store a page is one round trip, not 100.
        return list(read_ahead(chosen, self.load, min(self.read_workers, len(chosen)))), next_token

    def stats(self) -> Stats:
        """Counts, band sizes, the oldest waiting age and dead letters: O(log n) commands."""
        by_state, by_stage = self.index.counts()
        return Stats(by_state, by_stage, self.queue_depths(), self.index.dead_letter_count(), self.desk.waiting(),
                     round(self.desk.oldest_waiting_s(), 3))

    # -- humans ----------------------------------------------------------------------------------

    def next_review(self, annotator: str, stage: Stage | None = None) -> Item | None:
        """Claim the next review-queue item for ``annotator``; ``item.lease`` is theirs (see review.py)."""
        return self.desk.next(annotator, stage)

    def submit_review(self, submission: ReviewSubmission) -> Item:
        """A human's decision on an item they hold: accept with their phrases and masks, or discard."""
        return self.desk.submit(submission)


def _model_id(out: dict, *names: str) -> str:
    """The first of ``names`` in a step's outputs ("" when a worker of an older version sent none)."""
    for name in names:
        if name in out:
            return _need(out, name, str)
    return ""


def _need(out: dict, name: str, kind: type):
    value = out.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidInput(f"step output {name!r} must be {kind.__name__}, got {value!r:.100}")
    return value

