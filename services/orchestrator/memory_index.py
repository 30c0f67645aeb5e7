"""``MemoryIndex``: the orchestrator's index in one process (the embedded mode of ``dataengine
run`` and the local studio), with the semantics of ``RedisIndex``: sorted id lists per (state,
stage) and sorted (rank, id) lists per stage for the queue, kept with ``bisect``."""

from __future__ import annotations

import bisect
import secrets
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from services.orchestrator.index import by_key, merge_pages, put_args
from services.orchestrator.model import QUEUE_BANDS, Item, ItemState, Stage


def _insert(values: list, value) -> None:
    i = bisect.bisect_left(values, value)
    if i == len(values) or values[i] != value:
        values.insert(i, value)


def _remove(values: list, value) -> None:
    i = bisect.bisect_left(values, value)
    if i < len(values) and values[i] == value:
        del values[i]


class MemoryIndex:
    """In-process index for the embedded mode (one process: a lock guards every change)."""

    def __init__(self) -> None:
        self._key: dict[str, str] = {}  # id -> its by:<STATE>:<STAGE> key
        self._by: dict[str, list[str]] = {}  # key -> sorted ids
        self._free: dict[str, list[tuple[float, str]]] = {}  # free:<STAGE> -> sorted (rank, id)
        self._since: list[tuple[float, str]] = []  # sorted (queued at, id) of the free items
        self._queued: dict[str, tuple[float, float, str]] = {}  # id -> (rank, since, free key)
        self._leased: dict[str, float] = {}  # id -> lease expiry
        self._skipped: dict[str, set[str]] = {}
        self._own: dict[str, set[str]] = {}
        self._marks: dict[str, tuple[str, list[str]]] = {}  # id -> (audit reviewer, skippers) filed
        self._claims: dict[str, dict] = {}
        self._reviewed: dict[str, int] = {}
        self._totals: dict[str, dict[str, float]] = {}
        self._dead: list[dict] = []
        self._phrases: dict[str, set[str]] = {}
        self._inflight: dict[str, dict[str, float]] = {}  # step -> item -> sent at
        self._secret = secrets.token_bytes(32)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.RLock()

    # -- items -----------------------------------------------------------------------------------

    def put(self, item: Item) -> None:
        item_id, key, fkey, rank, since, until, own, *skippers = put_args(item)
        with self._guard:
            old = self._key.get(item_id)
            if old != key:
                if old is not None:
                    _remove(self._by[old], item_id)
                _insert(self._by.setdefault(key, []), item_id)
                self._key[item_id] = key
            self._unqueue(item_id)
            old_own, old_skippers = self._marks.pop(item_id, ("", []))
            for name in old_skippers:
                self._skipped.get(name, set()).discard(item_id)
            if old_own:
                self._own.get(old_own, set()).discard(item_id)
            if rank == "":
                return
            self._queued[item_id] = (float(rank), float(since), fkey)
            if until:
                self._leased[item_id] = float(until)
            else:
                self._free_add(item_id)
            for name in skippers:
                self._skipped.setdefault(name, set()).add(item_id)
            if own:
                self._own.setdefault(own, set()).add(item_id)
            self._marks[item_id] = (own, list(skippers))

    def _unqueue(self, item_id: str) -> None:
        self._leased.pop(item_id, None)
        queued = self._queued.pop(item_id, None)
        if queued is not None:
            rank, since, fkey = queued
            _remove(self._free.get(fkey, []), (rank, item_id))
            _remove(self._since, (since, item_id))

    def _free_add(self, item_id: str) -> None:
        rank, since, fkey = self._queued[item_id]
        _insert(self._free.setdefault(fkey, []), (rank, item_id))
        _insert(self._since, (since, item_id))

    def put_many(self, items: Iterable[Item]) -> int:
        count = 0
        for it in items:
            self.put(it)
            count += 1
        return count

    def page(self, state: ItemState | None, stage: Stage | None, after: str, count: int) -> list[str]:
        keys = [by_key(s, g) for s in ([state] if state else ItemState) for g in ([stage] if stage else Stage)]
        with self._guard:
            pages = []
            for key in keys:
                values = self._by.get(key, [])
                start = bisect.bisect_right(values, after) if after else 0
                pages.append(values[start:start + count])
        return merge_pages(pages, count)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        by_state: dict[str, int] = {}
        by_stage: dict[str, int] = {}
        with self._guard:
            for key, values in self._by.items():
                if values:
                    _, state, stage = key.split(":")
                    by_state[state.lower()] = by_state.get(state.lower(), 0) + len(values)
                    by_stage[stage.lower()] = by_stage.get(stage.lower(), 0) + len(values)
        return by_state, by_stage

    # -- the review queue ------------------------------------------------------------------------

    def requeue_expired(self, now: float, most: int = 100) -> int:
        with self._guard:
            expired = sorted((t, i) for i, t in self._leased.items() if t <= now)[:most]
            for _, item_id in expired:
                del self._leased[item_id]
                self._free_add(item_id)
            return len(expired)

    def free(self, stage: Stage, offset: int, count: int) -> list[tuple[str, float]]:
        with self._guard:
            return [(i, r) for r, i in self._free.get("free:" + stage.name, [])[offset:offset + count]]

    def avoided(self, annotator: str, ids: list[str]) -> tuple[set[str], set[str]]:
        with self._guard:
            return (set(ids) & self._skipped.get(annotator, set()), set(ids) & self._own.get(annotator, set()))

    def take(self, item_id: str, until: float) -> bool:
        with self._guard:
            queued = self._queued.get(item_id)
            if queued is None or item_id in self._leased:
                return False
            rank, since, fkey = queued
            _remove(self._free[fkey], (rank, item_id))
            _remove(self._since, (since, item_id))
            self._leased[item_id] = until
            return True

    def claim_of(self, annotator: str) -> dict | None:
        claim = self._claims.get(annotator)
        return dict(claim) if claim else None

    def set_claim(self, annotator: str, claim: dict | None) -> None:
        if claim is None:
            self._claims.pop(annotator, None)
        else:
            self._claims[annotator] = dict(claim)

    def waiting(self) -> dict[str, int]:
        counts = dict.fromkeys(QUEUE_BANDS, 0)
        with self._guard:
            for values in self._free.values():
                for b, band in enumerate(QUEUE_BANDS):
                    counts[band] += (bisect.bisect_left(values, (2 * b + 2, "")) - bisect.bisect_left(values, (2 * b, "")))
        return counts

    def oldest_free(self) -> float | None:
        with self._guard:
            return self._since[0][0] if self._since else None

    # -- annotators ------------------------------------------------------------------------------

    def add_review(self, item_id: str, number: int, entry: dict) -> None:
        with self._guard:
            if number < self._reviewed.get(item_id, 0):
                return
            self._reviewed[item_id] = number + 1
            who, audited = entry["annotator"], entry.get("audited") or ""
            totals = self._totals.setdefault(who, {})
            if entry["kind"] == "review":
                for name, value in (("items", 1), ("masks", int(entry["masks"])), ("seconds", float(entry["seconds"]))):
                    totals[name] = totals.get(name, 0) + value
            elif audited:
                agreement = entry.get("agreement") or {}
                theirs = self._totals.setdefault(audited, {})
                for name, value in (("audits", 1), ("decision_sum", float(agreement.get("decision", 0.0))),
                                    ("iou_sum", float(agreement.get("mask_iou", 0.0)))):
                    theirs[name] = theirs.get(name, 0) + value

    def annotator_totals(self) -> dict[str, dict[str, float]]:
        with self._guard:
            return {name: dict(v) for name, v in sorted(self._totals.items())}

    # -- dead letters, phrases, steps in flight ---------------------------------------------------

    def add_dead_letter(self, entry: dict) -> None:
        self._dead.append(dict(entry))

    def dead_letter_count(self) -> int:
        return len(self._dead)

    def dead_letters(self, start: int = 0, count: int = -1) -> list[dict]:
        return [dict(e) for e in (self._dead[start:] if count < 0 else self._dead[start:start + count])]

    def put_phrases(self, item_id: str, phrases: list[str]) -> None:
        for phrase in phrases:
            self._phrases.setdefault(phrase, set()).add(item_id)

    def put_phrases_many(self, entries: Iterable[tuple[str, list[str]]]) -> None:
        for item_id, phrases in entries:
            self.put_phrases(item_id, phrases)

    def carriers(self, phrases: list[str]) -> dict[str, int]:
        return {p: len(self._phrases.get(p, ())) for p in phrases}

    def track(self, item_id: str, step: str, sent_at: float) -> None:
        self._inflight.setdefault(step, {})[item_id] = sent_at

    def untrack(self, item_id: str, step: str) -> None:
        self._inflight.get(step, {}).pop(item_id, None)

    def tracked(self, item_id: str, step: str) -> float | None:
        return self._inflight.get(step, {}).get(item_id)

    def due(self, step: str, before: float, count: int) -> list[tuple[str, float]]:
        # O(in flight): the embedded mode loses no message, nothing sweeps it but tests.
        return sorted(((i, t) for i, t in self._inflight.get(step, {}).items() if t < before),
                      key=lambda e: (e[1], e[0]))[:count]

    def secret(self) -> bytes:
        return self._secret

    @contextmanager
    def lock(self, item_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(item_id, threading.Lock())
        with lock:
            yield

    def clear(self) -> None:
        with self._guard:
            self._key.clear()
            self._by.clear()
            self._free.clear()
            self._since.clear()
            self._queued.clear()
            self._leased.clear()
            self._skipped.clear()
            self._own.clear()
            self._marks.clear()
            self._inflight.clear()
