"""Indices over the item manifests: items by state and stage, dead letters, per-item locks.

The manifests in the object store are the source of truth; an index can always be rebuilt from
them (``dataengine reconcile``). ``RedisIndex`` serves the distributed deployment (several
orchestrator workers share it); ``MemoryIndex`` serves the embedded mode (one process).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Protocol

from services.common.errors import TransientError
from services.orchestrator.model import Item, ItemState, Stage

PREFIX = "dataengine:idx:"


class Index(Protocol):
    """put: the item's state, stage and review-queue rank (``Item.queue_rank``). queue: the queued
    ids, lowest rank first. queued_since: the ``count`` longest-queued ids with the unix time they
    entered the queue (``Item.queued_at``), oldest first. claims: annotator -> {"item_id", "band", "expires_at"}, a hint of who
    holds what (the manifest's lease is the truth). review events: one entry per human review or
    audit (``key`` makes re-adding one idempotent), what annotator figures are computed from.
    phrases: which items' verified output carries each phrase (a set per phrase: putting an item
    again changes nothing), for active mining's rare phrases; ``carriers`` counts them."""

    def put(self, item: Item) -> None: ...
    def queue(self) -> list[tuple[str, float]]: ...
    def queued_since(self, count: int) -> list[tuple[str, float]]: ...
    def set_claim(self, annotator: str, claim: dict | None) -> None: ...
    def claims(self) -> dict[str, dict]: ...
    def put_review_event(self, key: str, entry: dict) -> None: ...
    def review_events(self) -> list[dict]: ...
    def ids(self, state: ItemState | None = None, stage: Stage | None = None) -> list[str]: ...
    def counts(self) -> tuple[dict[str, int], dict[str, int]]: ...
    def add_dead_letter(self, entry: dict) -> None: ...
    def dead_letters(self) -> list[dict]: ...
    def put_phrases(self, item_id: str, phrases: list[str]) -> None: ...
    def carriers(self, phrases: list[str]) -> dict[str, int]: ...
    def lock(self, item_id: str): ...
    def clear(self) -> None: ...


def page(ids: list[str], page_size: int, token: str) -> tuple[list[str], str]:
    """One page of sorted ``ids`` after ``token`` (the last id of the previous page)."""
    start = bisect.bisect_right(ids, token) if token else 0
    chosen = ids[start:start + page_size]
    more = start + page_size < len(ids)
    return chosen, (chosen[-1] if more and chosen else "")


class MemoryIndex:
    """In-process index for the embedded mode."""

    def __init__(self) -> None:
        self._meta: dict[str, tuple[ItemState, Stage]] = {}
        self._rank: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self._claims: dict[str, dict] = {}
        self._events: dict[str, dict] = {}
        self._dead: list[dict] = []
        self._phrases: dict[str, set[str]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def put(self, item: Item) -> None:
        self._meta[item.item_id] = (item.state, item.stage)
        rank = item.queue_rank
        if rank is None:
            self._rank.pop(item.item_id, None)
            self._since.pop(item.item_id, None)
        else:
            self._rank[item.item_id] = rank
            self._since[item.item_id] = item.queued_at

    def queue(self) -> list[tuple[str, float]]:
        return sorted(self._rank.items(), key=lambda kv: (kv[1], kv[0]))

    def queued_since(self, count: int) -> list[tuple[str, float]]:
        return sorted(self._since.items(), key=lambda kv: (kv[1], kv[0]))[:count]

    def set_claim(self, annotator: str, claim: dict | None) -> None:
        if claim is None:
            self._claims.pop(annotator, None)
        else:
            self._claims[annotator] = dict(claim)

    def claims(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self._claims.items()}

    def put_review_event(self, key: str, entry: dict) -> None:
        self._events[key] = dict(entry)

    def review_events(self) -> list[dict]:
        return list(self._events.values())

    def ids(self, state: ItemState | None = None, stage: Stage | None = None) -> list[str]:
        return sorted(i for i, (st, sg) in self._meta.items()
                      if (state is None or st == state) and (stage is None or sg == stage))

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        by_state: dict[str, int] = {}
        by_stage: dict[str, int] = {}
        for state, stage in self._meta.values():
            by_state[state.name.lower()] = by_state.get(state.name.lower(), 0) + 1
            by_stage[stage.name.lower()] = by_stage.get(stage.name.lower(), 0) + 1
        return by_state, by_stage

    def add_dead_letter(self, entry: dict) -> None:
        self._dead.append(entry)

    def dead_letters(self) -> list[dict]:
        return list(self._dead)

    def put_phrases(self, item_id: str, phrases: list[str]) -> None:
        for phrase in phrases:
            self._phrases.setdefault(phrase, set()).add(item_id)

    def carriers(self, phrases: list[str]) -> dict[str, int]:
        return {p: len(self._phrases.get(p, ())) for p in phrases}

    @contextmanager
    def lock(self, item_id: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(item_id, threading.Lock())
        with lock:
            yield

    def clear(self) -> None:
        self._meta.clear()
        self._rank.clear()
        self._since.clear()


# Move an item between the state and stage sets atomically (a script runs alone on the server),
# so counts never see an item twice, even when two writers put the same item at once.
_PUT = """
local id, state, stage, prefix, rank, since = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local old = redis.call('HGET', prefix .. 'meta', id)
if old then
  local sep = string.find(old, ':', 1, true)
  redis.call('SREM', prefix .. 'state:' .. string.sub(old, 1, sep - 1), id)
  redis.call('SREM', prefix .. 'stage:' .. string.sub(old, sep + 1), id)
end
redis.call('HSET', prefix .. 'meta', id, state .. ':' .. stage)
redis.call('SADD', prefix .. 'state:' .. state, id)
redis.call('SADD', prefix .. 'stage:' .. stage, id)
if rank == '' then
  redis.call('ZREM', prefix .. 'queue', id)
  redis.call('ZREM', prefix .. 'queued_at', id)
else
  redis.call('ZADD', prefix .. 'queue', rank, id)
  redis.call('ZADD', prefix .. 'queued_at', since, id)
end
"""


class RedisIndex:
    """Sets per state and per stage, a hash of each item's (state, stage), a dead-letter list.

    ``put`` moves an item between sets in one server-side script (one round trip, atomic). ``lock`` is a Redis lock per item: two orchestrator workers applying the embed and the
    propose report of one item at once would otherwise lose one of the two updates.
    """

    def __init__(self, url: str, lock_timeout_s: float = 60.0, lock_ttl_s: float = 5.0) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.lock_timeout_s = lock_timeout_s
        self.lock_ttl_s = lock_ttl_s
        self._put = self.redis.register_script(_PUT)

    def _call(self, what: str, fn):
        import redis

        try:
            return fn()
        except redis.RedisError as exc:
            raise TransientError(f"redis index: {what} failed: {exc}") from exc

    def put(self, item: Item) -> None:
        rank = item.queue_rank
        self._call("put", lambda: self._put(args=[item.item_id, item.state.name, item.stage.name, PREFIX,
                                                  "" if rank is None else repr(rank), repr(item.queued_at)]))

    def queue(self) -> list[tuple[str, float]]:
        return [(i, float(r)) for i, r in self._call(
            "queue", lambda: self.redis.zrange(PREFIX + "queue", 0, -1, withscores=True))]

    def queued_since(self, count: int) -> list[tuple[str, float]]:
        return [(i, float(t)) for i, t in self._call(
            "queued since", lambda: self.redis.zrange(PREFIX + "queued_at", 0, count - 1, withscores=True))]

    def set_claim(self, annotator: str, claim: dict | None) -> None:
        if claim is None:
            self._call("claim", lambda: self.redis.hdel(PREFIX + "claims", annotator))
        else:
            self._call("claim", lambda: self.redis.hset(PREFIX + "claims", annotator, json.dumps(claim)))

    def claims(self) -> dict[str, dict]:
        raw = self._call("claims", lambda: self.redis.hgetall(PREFIX + "claims"))
        return {k: json.loads(v) for k, v in raw.items()}

    def put_review_event(self, key: str, entry: dict) -> None:
        self._call("review event", lambda: self.redis.hset(PREFIX + "reviews", key, json.dumps(entry)))

    def review_events(self) -> list[dict]:
        return [json.loads(v) for v in self._call("review events",
                                                  lambda: self.redis.hvals(PREFIX + "reviews"))]

    def ids(self, state: ItemState | None = None, stage: Stage | None = None) -> list[str]:
        keys = ([PREFIX + "state:" + state.name] if state is not None else []) + (
            [PREFIX + "stage:" + stage.name] if stage is not None else [])
        if not keys:
            return sorted(self._call("list", lambda: self.redis.hkeys(PREFIX + "meta")))
        return sorted(self._call("list", lambda: self.redis.sinter(keys)))

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for state in ItemState:
                pipe.scard(PREFIX + "state:" + state.name)
            for stage in Stage:
                pipe.scard(PREFIX + "stage:" + stage.name)
            return pipe.execute()

        values = self._call("count", run)
        n = len(ItemState)
        by_state = {s.name.lower(): c for s, c in zip(ItemState, values[:n]) if c}
        by_stage = {s.name.lower(): c for s, c in zip(Stage, values[n:]) if c}
        return by_state, by_stage

    def add_dead_letter(self, entry: dict) -> None:
        self._call("dead letter", lambda: self.redis.rpush(PREFIX + "dead", json.dumps(entry)))

    def dead_letters(self) -> list[dict]:
        return [json.loads(e) for e in self._call("dead letters", lambda: self.redis.lrange(PREFIX + "dead", 0, -1))]

    def put_phrases(self, item_id: str, phrases: list[str]) -> None:
        if phrases:
            def run():
                pipe = self.redis.pipeline(transaction=False)
                for phrase in phrases:
                    pipe.sadd(PREFIX + "phrase:" + phrase, item_id)
                pipe.execute()

            self._call("put phrases", run)

    def carriers(self, phrases: list[str]) -> dict[str, int]:
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for phrase in phrases:
                pipe.scard(PREFIX + "phrase:" + phrase)
            return dict(zip(phrases, pipe.execute()))

        return self._call("phrase carriers", run) if phrases else {}

    @contextmanager
    def lock(self, item_id: str) -> Iterator[None]:
        """The item's lock, waiting up to ``lock_timeout_s`` for it. It lives ``lock_ttl_s`` and is
        renewed every third of that while held: a holder that dies (SIGKILL, OOM) frees it within
        ``lock_ttl_s``, not after the longest any report could take."""
        # thread_local=False: the renewing thread must see the token the holder acquired with.
        lock = self.redis.lock(PREFIX + "lock:" + item_id, timeout=self.lock_ttl_s,
                               blocking_timeout=self.lock_timeout_s, thread_local=False)
        if not self._call("lock", lock.acquire):
            raise TransientError(f"item {item_id} stayed locked for {self.lock_timeout_s} s")
        released = threading.Event()

        def renew() -> None:
            while not released.wait(self.lock_ttl_s / 3):
                try:
                    lock.extend(self.lock_ttl_s, replace_ttl=True)
                except Exception:  # noqa: BLE001 - lost (expired meanwhile): the holder's write still lands
                    return

        renewer = threading.Thread(target=renew, name=f"lock-{item_id}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            released.set()
            renewer.join()
            try:
                lock.release()
            except Exception:  # noqa: BLE001 - expired: the next holder already has it
                pass

    def clear(self) -> None:
        """Drop the state, stage and queue sets (``resume`` rebuilds them); dead letters, claims,
        review events and phrase sets (re-put idempotently) and locks stay."""

        def run():
            keys = [PREFIX + "meta", PREFIX + "queue", PREFIX + "queued_at"] + list(self.redis.scan_iter(PREFIX + "state:*")) + list(
                self.redis.scan_iter(PREFIX + "stage:*"))
            self.redis.delete(*keys)

        self._call("clear", run)


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
