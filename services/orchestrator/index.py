"""The orchestrator's index over the item manifests: what a request needs to find items without
reading the store.

The manifests in the object store are the source of truth; the index can always be rebuilt from
them (``dataengine reconcile``). ``RedisIndex`` (redis_index.py) serves the distributed deployment
(several orchestrator processes share it); ``MemoryIndex`` (memory_index.py) the embedded mode.
Both keep ids and scores only, and both answer every request-path call in O(1), O(log n) or
O(page) of the store's size n.
"""

from __future__ import annotations

import heapq
import json
import time
from typing import Iterable, Protocol

from services.common.errors import TransientError
from services.orchestrator.model import Item, ItemState, Stage

PREFIX = "dataengine:idx:"


class Index(Protocol):
    """Items: ``put`` files an item by its state, stage, review-queue rank (``Item.queue_rank``),
    lease, skips and audit; ``page`` gives ids after a cursor in id order; ``counts`` per state and
    stage (non-zero ones).

    The review queue: queued items nobody holds (``free``, per stage, by rank); ``take`` moves one
    to the leased ones (atomically: one claimer wins); ``requeue_expired`` hands expired leases
    back; ``avoided`` says which ids an annotator skipped or may not audit; ``waiting`` counts the
    free items per band; ``oldest_free`` is the unix time the longest-waiting one was queued.
    ``claim_of``/``set_claim``: the item an annotator holds (a hint; the manifest's lease is the truth).

    Annotators: ``add_review`` adds review number ``number`` of an item to the per-annotator
    aggregates once; ``annotator_totals`` reads them. Steps in flight: ``track`` a step with the
    time it was sent, ``untrack`` it once reported; ``due`` lists (item, sent at) of a step's
    tracked items sent before (strictly) a time, oldest first (the sweep's work list).
    phrases: which items' verified output carries each phrase, for active mining's rare phrases.
    """

    def put(self, item: Item) -> None: ...
    def put_many(self, items: Iterable[Item]) -> int: ...
    def page(self, state: ItemState | None, stage: Stage | None, after: str, count: int) -> list[str]: ...
    def counts(self) -> tuple[dict[str, int], dict[str, int]]: ...
    def requeue_expired(self, now: float, most: int = 100) -> int: ...
    def free(self, stage: Stage, offset: int, count: int) -> list[tuple[str, float]]: ...
    def avoided(self, annotator: str, ids: list[str]) -> tuple[set[str], set[str]]: ...
    def take(self, item_id: str, until: float) -> bool: ...
    def claim_of(self, annotator: str) -> dict | None: ...
    def set_claim(self, annotator: str, claim: dict | None) -> None: ...
    def waiting(self) -> dict[str, int]: ...
    def oldest_free(self) -> float | None: ...
    def add_review(self, item_id: str, number: int, entry: dict) -> None: ...
    def annotator_totals(self) -> dict[str, dict[str, float]]: ...
    def add_dead_letter(self, entry: dict) -> None: ...
    def dead_letter_count(self) -> int: ...
    def dead_letters(self, start: int = 0, count: int = -1) -> list[dict]: ...
    def put_phrases(self, item_id: str, phrases: list[str]) -> None: ...
    def put_phrases_many(self, entries: Iterable[tuple[str, list[str]]]) -> None: ...
    def carriers(self, phrases: list[str]) -> dict[str, int]: ...
    def track(self, item_id: str, step: str, sent_at: float) -> None: ...
    def untrack(self, item_id: str, step: str) -> None: ...
    def tracked(self, item_id: str, step: str) -> float | None: ...
    def due(self, step: str, before: float, count: int) -> list[tuple[str, float]]: ...
    def secret(self) -> bytes: ...
    def lock(self, item_id: str): ...
    def clear(self) -> None: ...


def by_key(state: ItemState, stage: Stage) -> str:
    return f"by:{state.name}:{stage.name}"


def put_args(item: Item) -> list:
    """What ``put`` files an item by: id, its (state, stage) set, its free set, rank ('' when not
    queued), queue time, lease expiry ('' when none), the reviewer it may not be audited by ('' when
    it is no audit), then the annotators who skipped it."""
    rank = item.queue_rank
    own = item.reviewer if item.band == "audit" and item.reviewer else ""
    return [item.item_id, by_key(item.state, item.stage), "free:" + item.stage.name,
            "" if rank is None else repr(rank), repr(item.queued_at),
            "" if item.lease is None or rank is None else repr(item.lease.expires_at), own, *item.skipped_by]


def merge_pages(pages: Iterable[list[str]], count: int) -> list[str]:
    """The first ``count`` ids of several sorted id lists (each set's page), merged in id order."""
    return list(heapq.merge(*pages))[:count]


def ids(index: Index, state: ItemState | None = None, stage: Stage | None = None, batch: int = 1000):
    """Every id in ``state``/``stage`` in id order, a page at a time (admin commands: rerun, tests)."""
    after = ""
    while True:
        chunk = index.page(state, stage, after, batch)
        yield from chunk
        if len(chunk) < batch:
            return
        after = chunk[-1]


def queue_depths(redis_url: str, queues: tuple[str, ...]) -> dict[str, int]:
    """Messages per Celery queue on Redis: ready (the queue's lists, every priority level) plus
    unacknowledged (delivered to a worker, not yet acked: kombu's ``unacked`` hash)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        depths = {}
        for queue in queues:
            ready = 0
            # kombu keeps one list per priority step: the queue name, then name + "\x06\x16" + step.
            for key in [queue.encode()] + [f"{queue}\x06\x16{p}".encode() for p in range(1, 10)]:
                ready += client.llen(key)
            depths[queue] = ready
        for raw in client.hvals("unacked"):
            try:
                routing_key = json.loads(raw)[2]
            except (ValueError, IndexError, TypeError):
                continue
            if routing_key in depths:
                depths[routing_key] += 1
        return depths
    except redis.RedisError as exc:
        raise TransientError(f"reading queue depths from {redis_url} failed: {exc}") from exc
    finally:
        client.close()


def now() -> float:
    return round(time.time(), 3)


def __getattr__(name: str):
    """``MemoryIndex`` and ``RedisIndex`` from here, imported on first use: their modules build on
    this one, so either may be imported first."""
    if name == "MemoryIndex":
        from services.orchestrator.memory_index import MemoryIndex
        return MemoryIndex
    if name == "RedisIndex":
        from services.orchestrator.redis_index import RedisIndex
        return RedisIndex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PREFIX", "Index", "MemoryIndex", "RedisIndex", "ids", "now", "queue_depths"]
