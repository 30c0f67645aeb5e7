"""``RedisIndex``: the orchestrator's index on Redis, shared by every orchestrator process.

Every request path costs O(1), O(log n) or O(page) in the store's size n; only ``clear`` and the
admin listings walk a whole structure. Keys (all under ``PREFIX``), ids and scores only:

- ``by:<STATE>:<STAGE>``: a sorted set per (state, stage), every score 0, so members sort by id:
  ``ZCARD`` counts, ``ZRANGEBYLEX`` pages (a cursor: the last id). An item is in exactly one.
- ``free:<STAGE>``: queued items nobody holds a lease on, scored by ``Item.queue_rank``: a claim
  reads the head, band sizes are ``ZCOUNT``s of the rank ranges. ``free_since``: the same items
  scored by the unix time they entered the queue (the oldest waiting age is its head).
- ``leased``: queued items under a lease, scored by the lease's expiry; ``held`` keeps each one's
  rank, queue time and free set so an expired lease goes back to its place without a manifest read.
- ``skipped:<annotator>`` / ``own:<annotator>``: the queued items they skipped (theirs last) or
  reviewed and now wait for an audit (never theirs): a claim skips them with one ``SMISMEMBER``.
- ``claims``: annotator -> the item they hold (read with ``HGET``, one annotator at a time).
- ``ann:<annotator>`` aggregates, ``annotators`` their names, ``reviewed`` item -> reviews counted.
- ``inflight:<step>``: items whose step was sent and not yet reported, scored by the send time
  (the self-healing sweep's work list, sweep.py).
- ``carriers:<phrase>``: a HyperLogLog of the items carrying the phrase (active mining's rare
  phrases): adding an item again changes nothing, a count costs O(1) and the memory is per phrase
  (at most 12 KB; a few hundred bytes for the rare ones it matters for), not per item. Counts are
  exact for the small numbers a rarity bar compares with and within ~1% above.
- ``dead`` (a list), ``lock:<item>``, ``secret``.
"""

from __future__ import annotations

import json
import secrets
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from services.common.errors import TransientError
from services.orchestrator.index import PREFIX, by_key, merge_pages, put_args
from services.orchestrator.model import QUEUE_BANDS, Item, ItemState, Stage

_BY = [by_key(state, stage) for state in ItemState for stage in Stage]
_FREE = ["free:" + stage.name for stage in Stage]
_LUA_LISTS = ("local BY = {" + ",".join(f"'{k}'" for k in _BY) + "}\n"
              "local FREE = {" + ",".join(f"'{k}'" for k in _FREE) + "}\n")

# ARGV: prefix, id, by key, free key, rank ('' = not queued), queued since, lease expiry ('' =
# none), audit reviewer ('' = none), then the annotators who skipped it. Atomic (a script runs
# alone on the server): counts never see an item twice, even when two writers put it at once.
_PUT = _LUA_LISTS + """
local p, id, key, fkey, rank, since, until_, own = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
if not redis.call('ZSCORE', p .. key, id) then
  for _, k in ipairs(BY) do if k ~= key then redis.call('ZREM', p .. k, id) end end
  redis.call('ZADD', p .. key, 0, id)
end
for _, k in ipairs(FREE) do if k ~= fkey or rank == '' or until_ ~= '' then redis.call('ZREM', p .. k, id) end end
local op = 'SADD'
if rank == '' then
  op = 'SREM'
  redis.call('ZREM', p .. 'free_since', id)
  redis.call('ZREM', p .. 'leased', id)
  redis.call('HDEL', p .. 'held', id)
elseif until_ ~= '' then
  redis.call('ZREM', p .. 'free_since', id)
  redis.call('ZADD', p .. 'leased', until_, id)
  redis.call('HSET', p .. 'held', id, rank .. ' ' .. since .. ' ' .. fkey)
else
  redis.call('ZREM', p .. 'leased', id)
  redis.call('HDEL', p .. 'held', id)
  redis.call('ZADD', p .. fkey, rank, id)
  redis.call('ZADD', p .. 'free_since', since, id)
end
for i = 9, #ARGV do redis.call(op, p .. 'skipped:' .. ARGV[i], id) end
if own ~= '' then redis.call(op, p .. 'own:' .. own, id) end
"""

# ARGV: prefix, now, most. Leases expired by ``now`` go back to their free set; returns how many.
_REQUEUE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p .. 'leased', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  local info = redis.call('HGET', p .. 'held', id)
  redis.call('ZREM', p .. 'leased', id)
  redis.call('HDEL', p .. 'held', id)
  if info then
    local rank, since, fkey = string.match(info, '^(%S+) (%S+) (%S+)$')
    redis.call('ZADD', p .. fkey, rank, id)
    redis.call('ZADD', p .. 'free_since', since, id)
  end
end
return #ids
"""

# ARGV: prefix, id, lease expiry. Moves a free item to ``leased``; 1 if it was free, else 0 (taken
# by another claimer first: exactly one of two racing claimers gets it).
_TAKE = _LUA_LISTS + """
local p, id = ARGV[1], ARGV[2]
for _, k in ipairs(FREE) do
  local rank = redis.call('ZSCORE', p .. k, id)
  if rank then
    local since = redis.call('ZSCORE', p .. 'free_since', id) or '0'
    redis.call('ZREM', p .. k, id)
    redis.call('ZREM', p .. 'free_since', id)
    redis.call('ZADD', p .. 'leased', ARGV[3], id)
    redis.call('HSET', p .. 'held', id, rank .. ' ' .. since .. ' ' .. k)
    return 1
  end
end
return 0
"""

# ARGV: prefix, item id, review number, annotator, kind, masks, seconds, audited, decision, iou.
# Adds one review to the annotators' aggregates once: reviews of an item are numbered in order,
# and ``reviewed`` keeps how many of them are counted (a rebuild adds them again: no change).
_REVIEW = """
local p, id, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
if n < (tonumber(redis.call('HGET', p .. 'reviewed', id)) or 0) then return 0 end
redis.call('HSET', p .. 'reviewed', id, n + 1)
local who, kind, audited = ARGV[4], ARGV[5], ARGV[8]
redis.call('SADD', p .. 'annotators', who)
if kind == 'review' then
  redis.call('HINCRBY', p .. 'ann:' .. who, 'items', 1)
  redis.call('HINCRBY', p .. 'ann:' .. who, 'masks', ARGV[6])
  redis.call('HINCRBYFLOAT', p .. 'ann:' .. who, 'seconds', ARGV[7])
elseif audited ~= '' then
  redis.call('SADD', p .. 'annotators', audited)
  redis.call('HINCRBY', p .. 'ann:' .. audited, 'audits', 1)
  redis.call('HINCRBYFLOAT', p .. 'ann:' .. audited, 'decision_sum', ARGV[9])
  redis.call('HINCRBYFLOAT', p .. 'ann:' .. audited, 'iou_sum', ARGV[10])
end
return 1
"""


class RedisIndex:
    """The index on Redis (see the module docstring for its keys). ``lock`` is a Redis lock per
    item: two orchestrator workers applying the embed and the propose report of one item at once
    would otherwise lose one of the two updates."""

    def __init__(self, url: str, lock_timeout_s: float = 60.0, lock_ttl_s: float = 5.0) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.lock_timeout_s = lock_timeout_s
        self.lock_ttl_s = lock_ttl_s
        self._put = self.redis.register_script(_PUT)
        self._requeue = self.redis.register_script(_REQUEUE)
        self._take = self.redis.register_script(_TAKE)
        self._review = self.redis.register_script(_REVIEW)

    def _call(self, what: str, fn):
        import redis

        try:
            return fn()
        except redis.RedisError as exc:
            raise TransientError(f"redis index: {what} failed: {exc}") from exc

    # -- items -----------------------------------------------------------------------------------

    def put(self, item: Item) -> None:
        self._call("put", lambda: self._put(args=[PREFIX, *put_args(item)]))

    def put_many(self, items: Iterable[Item], batch: int = 1000) -> int:
        """``put`` for many items, pipelined ``batch`` at a time (a rebuild, a bench's seeding)."""
        count = 0

        def flush(chunk: list[Item]) -> None:
            pipe = self.redis.pipeline(transaction=False)
            for it in chunk:
                self._put(args=[PREFIX, *put_args(it)], client=pipe)
            pipe.execute()

        chunk: list[Item] = []
        for it in items:
            chunk.append(it)
            if len(chunk) == batch:
                self._call("put", lambda: flush(chunk))
                count, chunk = count + len(chunk), []
        if chunk:
            self._call("put", lambda: flush(chunk))
        return count + len(chunk)

    def page(self, state: ItemState | None, stage: Stage | None, after: str, count: int) -> list[str]:
        keys = [by_key(s, g) for s in ([state] if state else ItemState) for g in ([stage] if stage else Stage)]
        start = "(" + after if after else "-"

        def run():
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.zrangebylex(PREFIX + key, start, "+", 0, count)
            return pipe.execute()

        return merge_pages(self._call("list", run), count)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for key in _BY:
                pipe.zcard(PREFIX + key)
            return pipe.execute()

        by_state: dict[str, int] = {}
        by_stage: dict[str, int] = {}
        for key, n in zip(_BY, self._call("count", run)):
            if n:
                _, state, stage = key.split(":")
                by_state[state.lower()] = by_state.get(state.lower(), 0) + n
                by_stage[stage.lower()] = by_stage.get(stage.lower(), 0) + n
        return by_state, by_stage

    # -- the review queue ------------------------------------------------------------------------

    def requeue_expired(self, now: float, most: int = 100) -> int:
        return int(self._call("requeue", lambda: self._requeue(args=[PREFIX, repr(now), most])))

    def free(self, stage: Stage, offset: int, count: int) -> list[tuple[str, float]]:
        return [(i, float(r)) for i, r in self._call("queue", lambda: self.redis.zrange(
            PREFIX + "free:" + stage.name, offset, offset + count - 1, withscores=True))]

    def avoided(self, annotator: str, ids: list[str]) -> tuple[set[str], set[str]]:
        if not ids:
            return set(), set()

        def run():
            pipe = self.redis.pipeline(transaction=False)
            pipe.smismember(PREFIX + "skipped:" + annotator, ids)
            pipe.smismember(PREFIX + "own:" + annotator, ids)
            return pipe.execute()

        skipped, own = self._call("queue", run)
        return ({i for i, hit in zip(ids, skipped) if hit}, {i for i, hit in zip(ids, own) if hit})

    def take(self, item_id: str, until: float) -> bool:
        return bool(self._call("claim", lambda: self._take(args=[PREFIX, item_id, repr(until)])))

    def claim_of(self, annotator: str) -> dict | None:
        raw = self._call("claim", lambda: self.redis.hget(PREFIX + "claims", annotator))
        return json.loads(raw) if raw else None

    def set_claim(self, annotator: str, claim: dict | None) -> None:
        if claim is None:
            self._call("claim", lambda: self.redis.hdel(PREFIX + "claims", annotator))
        else:
            self._call("claim", lambda: self.redis.hset(PREFIX + "claims", annotator, json.dumps(claim)))

    def waiting(self) -> dict[str, int]:
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for band in range(len(QUEUE_BANDS)):
                for stage in Stage:
                    pipe.zcount(PREFIX + "free:" + stage.name, 2 * band, f"({2 * band + 2}")
            return pipe.execute()

        values, n = self._call("waiting", run), len(Stage)
        return {band: sum(values[b * n:(b + 1) * n]) for b, band in enumerate(QUEUE_BANDS)}

    def oldest_free(self) -> float | None:
        head = self._call("waiting", lambda: self.redis.zrange(PREFIX + "free_since", 0, 0, withscores=True))
        return float(head[0][1]) if head else None

    # -- annotators ------------------------------------------------------------------------------

    def add_review(self, item_id: str, number: int, entry: dict) -> None:
        agreement = entry.get("agreement") or {}
        args = [PREFIX, item_id, number, entry["annotator"], entry["kind"], int(entry["masks"]),
                repr(float(entry["seconds"])), entry.get("audited") or "",
                repr(float(agreement.get("decision", 0.0))), repr(float(agreement.get("mask_iou", 0.0)))]
        self._call("review", lambda: self._review(args=args))

    def annotator_totals(self) -> dict[str, dict[str, float]]:
        def run():
            # One hash per annotator: the reply is as long as the team, whatever the store's size.
            names = sorted(self.redis.smembers(PREFIX + "annotators"))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(PREFIX + "ann:" + name)
            return dict(zip(names, pipe.execute()))

        return {name: {k: float(v) for k, v in fields.items()} for name, fields in self._call("annotators", run).items()}

    # -- dead letters, phrases, steps in flight ---------------------------------------------------

    def add_dead_letter(self, entry: dict) -> None:
        self._call("dead letter", lambda: self.redis.rpush(PREFIX + "dead", json.dumps(entry)))

    def dead_letter_count(self) -> int:
        return int(self._call("dead letters", lambda: self.redis.llen(PREFIX + "dead")))

    def dead_letters(self, start: int = 0, count: int = -1) -> list[dict]:
        stop = -1 if count < 0 else start + count - 1
        return [json.loads(e) for e in self._call("dead letters", lambda: self.redis.lrange(PREFIX + "dead", start, stop))]

    def put_phrases(self, item_id: str, phrases: list[str]) -> None:
        self.put_phrases_many([(item_id, phrases)])

    def put_phrases_many(self, entries: Iterable[tuple[str, list[str]]]) -> None:
        """(item id, its positive phrases) for many items in one round trip (a rebuild's batch)."""
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for item_id, phrases in entries:
                for phrase in phrases:
                    pipe.pfadd(PREFIX + "carriers:" + phrase, item_id)
            if len(pipe):
                pipe.execute()

        self._call("put phrases", run)

    def carriers(self, phrases: list[str]) -> dict[str, int]:
        def run():
            pipe = self.redis.pipeline(transaction=False)
            for phrase in phrases:
                pipe.pfcount(PREFIX + "carriers:" + phrase)
            return dict(zip(phrases, pipe.execute()))

        return self._call("phrase carriers", run) if phrases else {}

    def track(self, item_id: str, step: str, sent_at: float) -> None:
        self._call("track", lambda: self.redis.zadd(PREFIX + "inflight:" + step, {item_id: sent_at}))

    def untrack(self, item_id: str, step: str) -> None:
        self._call("track", lambda: self.redis.zrem(PREFIX + "inflight:" + step, item_id))

    def tracked(self, item_id: str, step: str) -> float | None:
        score = self._call("track", lambda: self.redis.zscore(PREFIX + "inflight:" + step, item_id))
        return None if score is None else float(score)

    def due(self, step: str, before: float, count: int) -> list[tuple[str, float]]:
        return [(i, float(t)) for i, t in self._call("sweep", lambda: self.redis.zrangebyscore(
            PREFIX + "inflight:" + step, "-inf", f"({before!r}", 0, count, withscores=True))]

    def secret(self) -> bytes:
        """A key every orchestrator process shares (for page tokens), made on first use."""
        def run():
            self.redis.set(PREFIX + "secret", secrets.token_hex(32), nx=True)
            return self.redis.get(PREFIX + "secret")

        return self._call("secret", run).encode()

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
        """Drop what ``rebuild_index`` puts again (items, the queue, leases, skips, steps in
        flight; and the keys of the layout before this one). Dead letters, claims, annotator
        aggregates (added once per review) and phrase carriers (re-put idempotently) stay."""
        patterns = ("by:*", "free:*", "skipped:*", "own:*", "inflight:*", "state:*", "stage:*", "phrase:*")
        fixed = ("free_since", "leased", "held", "meta", "queue", "queued_at", "reviews")

        def run():
            keys = [PREFIX + k for k in fixed]
            for pattern in patterns:  # an admin command: reading every key name is its job
                keys += list(self.redis.scan_iter(PREFIX + pattern, count=1000))
            for start in range(0, len(keys), 500):
                self.redis.delete(*keys[start:start + 500])

        self._call("clear", run)
