"""The orchestrator's indices against a real redis-server (``RedisIndex``) and in memory
(``MemoryIndex``): items by state and stage, dead letters, ``clear``, per-item locks under real
thread contention, Redis being down; token paging; Celery queue depths from real kombu messages,
delivered-but-unacknowledged ones included."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from services.common.errors import TransientError
from services.common.queues import create_celery
from services.common.settings import Settings
from services.orchestrator.index import PREFIX, MemoryIndex, RedisIndex, ids, queue_depths
from services.orchestrator.model import Item, ItemState, Stage
from tests.servers import free_port

S, G = ItemState, Stage


def item(item_id: str, state: ItemState = S.INGESTED, stage: Stage = G.FULLY_AUTOMATIC) -> Item:
    return Item(item_id=item_id, source=f"{item_id}.png", image_key=f"images/{item_id}", image_id=item_id,
                stage=stage, state=state)


@pytest.fixture(params=["redis", "memory"])
def index(request):
    if request.param == "memory":
        return MemoryIndex()
    return RedisIndex(request.getfixturevalue("broker"))


# -- items by state and stage -------------------------------------------------------------------

def test_put_moves_an_item_between_sets_and_counts_it_once(index):
    it = item("a")
    for state in (S.INGESTED, S.EMBEDDED, S.CONCEPTS_PROPOSED, S.MASKS_DECODED, S.VERIFIED, S.REVIEW):
        it.state = state
        index.put(it)
    index.put(it)  # the same state again (a redelivered report): still once
    assert index.counts() == ({"review": 1}, {"fully_automatic": 1})
    assert list(ids(index)) == ["a"]
    assert list(ids(index, S.REVIEW)) == ["a"]
    for old in (S.INGESTED, S.EMBEDDED, S.VERIFIED):
        assert list(ids(index, old)) == [], f"item left behind in {old.name}"
    it.stage = G.SEMI_AUTOMATIC  # a stage change moves it between the stage sets too
    index.put(it)
    assert index.counts() == ({"review": 1}, {"semi_automatic": 1})
    assert list(ids(index, stage=G.FULLY_AUTOMATIC)) == [] and list(ids(index, stage=G.SEMI_AUTOMATIC)) == ["a"]


def test_counts_and_ids_filtered_by_state_stage_both_and_none(index):
    items = [item("e", S.ACCEPTED), item("b", S.REVIEW), item("d", S.REVIEW, G.ASSISTED_MANUAL),
             item("a", S.REVIEW, G.SEMI_AUTOMATIC), item("c", S.FAILED, G.SEMI_AUTOMATIC),
             item("f", S.INGESTED, G.ASSISTED_MANUAL)]
    for it in items:
        index.put(it)
    assert index.counts() == ({"accepted": 1, "review": 3, "failed": 1, "ingested": 1},
                              {"fully_automatic": 2, "semi_automatic": 2, "assisted_manual": 2})
    assert list(ids(index)) == ["a", "b", "c", "d", "e", "f"]  # sorted, not insertion order
    assert list(ids(index, S.REVIEW)) == ["a", "b", "d"]
    assert list(ids(index, stage=G.SEMI_AUTOMATIC)) == ["a", "c"]
    assert list(ids(index, S.REVIEW, G.ASSISTED_MANUAL)) == ["d"]
    assert list(ids(index, S.REVIEW, G.FULLY_AUTOMATIC)) == ["b"]
    assert list(ids(index, S.REJECTED)) == [] and list(ids(index, S.ACCEPTED, G.ASSISTED_MANUAL)) == []


def test_an_empty_index_counts_nothing(index):
    assert index.counts() == ({}, {})
    assert list(ids(index)) == [] and list(ids(index, S.REVIEW, G.SEMI_AUTOMATIC)) == [] and index.dead_letters() == []


def test_dead_letters_round_trip_and_clear_keeps_them(index):
    letters = [{"item_id": "a", "step": "propose", "reason": "connection refused", "attempts": 5, "at": 1.5},
               {"item_id": "b", "step": "decode", "reason": "timeout", "attempts": 3, "at": 2.25}]
    for letter in letters:
        index.add_dead_letter(letter)
    index.put(item("a", S.FAILED))
    index.put(item("b", S.REVIEW, G.ASSISTED_MANUAL))
    assert index.dead_letters() == letters  # in order, every field intact

    index.clear()
    assert list(ids(index)) == [] and list(ids(index, S.FAILED)) == [] and list(ids(index, stage=G.ASSISTED_MANUAL)) == []
    assert index.counts() == ({}, {})
    assert index.dead_letters() == letters
    index.put(item("a", S.FAILED))  # rebuilt (as ``resume`` does): counted once again
    assert index.counts() == ({"failed": 1}, {"fully_automatic": 1})


def test_clear_leaves_no_index_key_but_the_dead_letters_in_redis(broker):
    index = RedisIndex(broker)
    index.put(item("a", S.REVIEW, G.SEMI_AUTOMATIC))
    index.put(item("b", S.ACCEPTED))
    index.add_dead_letter({"item_id": "b", "step": "embed"})
    client = redis.Redis.from_url(broker, decode_responses=True)
    assert client.zrange(PREFIX + "by:REVIEW:SEMI_AUTOMATIC", 0, -1) == ["a"]
    index.clear()
    assert sorted(client.keys(PREFIX + "*")) == [PREFIX + "dead"]
    client.close()


# -- locks ----------------------------------------------------------------------------------------

ROUNDS = 8


def test_lock_serializes_read_modify_write_across_threads(index, broker):
    """Two threads increment one Redis value under the item's lock, each with a read, a pause and a
    write: without mutual exclusion both would read the same value and one update would be lost."""
    client = redis.Redis.from_url(broker, decode_responses=True)
    client.set("counter", 0)
    inside, most_inside, errors = [0], [0], []
    guard = threading.Lock()
    start = threading.Barrier(2)

    def work():
        try:
            start.wait()
            for _ in range(ROUNDS):
                with index.lock("item-1"):
                    with guard:
                        inside[0] += 1
                        most_inside[0] = max(most_inside[0], inside[0])
                    value = int(client.get("counter"))
                    time.sleep(0.005)  # the other thread runs now: it must wait for the lock
                    client.set("counter", value + 1)
                    with guard:
                        inside[0] -= 1
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert int(client.get("counter")) == 2 * ROUNDS, "an update was lost"
    assert most_inside[0] == 1  # never two holders at once
    client.close()


def test_locks_of_different_items_are_independent(index):
    with index.lock("a"):
        with index.lock("b"):  # would wait forever (or time out) if "b" shared "a"'s lock
            pass
    with index.lock("a"):  # released on exit: can be taken again
        pass


def test_a_lock_held_elsewhere_past_the_timeout_is_a_transient_error(broker):
    holder, waiter = RedisIndex(broker), RedisIndex(broker, lock_timeout_s=0.2)
    with holder.lock("busy"):
        with pytest.raises(TransientError, match="item busy stayed locked for 0.2 s"):
            with waiter.lock("busy"):
                pytest.fail("entered a lock another worker holds")
    with waiter.lock("busy"):  # released by the holder: free again
        pass


def test_a_lock_released_by_an_exception_can_be_taken_again(index):
    with pytest.raises(RuntimeError):
        with index.lock("x"):
            raise RuntimeError("the step's report could not be applied")
    with index.lock("x"):
        pass


# -- Redis down -----------------------------------------------------------------------------------

@pytest.mark.parametrize("what, call", [
    ("put", lambda i: i.put(item("a"))),
    ("list", lambda i: i.page(None, None, "", 10)),
    ("list", lambda i: i.page(S.REVIEW, None, "a", 10)),
    ("claim", lambda i: i.take("a", 1.0)),
    ("requeue", lambda i: i.requeue_expired(1.0)),
    ("waiting", lambda i: i.waiting()),
    ("review", lambda i: i.add_review("a", 0, {"annotator": "ann", "kind": "review", "masks": 1, "seconds": 2})),
    ("track", lambda i: i.track("a", "embed", 1.0)),
    ("count", lambda i: i.counts()),
    ("dead letter", lambda i: i.add_dead_letter({"item_id": "a"})),
    ("dead letters", lambda i: i.dead_letters()),
    ("clear", lambda i: i.clear()),
    ("lock", lambda i: i.lock("a").__enter__()),
])
def test_redis_down_is_a_transient_error_naming_what_failed(what, call):
    index = RedisIndex(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    with pytest.raises(TransientError, match=f"redis index: {what} failed: .*(refused|connecting)"):
        call(index)


def test_queue_depths_with_redis_down_is_a_transient_error_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(TransientError, match=f"reading queue depths from {url} failed"):
        queue_depths(url, ("embedder",))


# -- paging ---------------------------------------------------------------------------------------

def test_pages_follow_the_cursor_in_id_order_across_state_and_stage_sets(index):
    for i in range(7):
        index.put(item(f"id{i}", S.REVIEW if i % 2 else S.ACCEPTED, G.SEMI_AUTOMATIC if i % 3 else G.FULLY_AUTOMATIC))
    assert index.page(None, None, "", 3) == ["id0", "id1", "id2"]
    assert index.page(None, None, "id2", 3) == ["id3", "id4", "id5"]
    assert index.page(None, None, "id5", 3) == ["id6"]
    assert index.page(S.REVIEW, None, "", 2) == ["id1", "id3"] and index.page(S.REVIEW, None, "id3", 2) == ["id5"]
    assert index.page(None, G.FULLY_AUTOMATIC, "", 10) == ["id0", "id3", "id6"]
    assert index.page(S.ACCEPTED, G.SEMI_AUTOMATIC, "", 10) == ["id2", "id4"]
    # The cursor is a position, not a member: an item that left the listing resumes after it.
    assert index.page(S.REVIEW, None, "id2", 1) == ["id3"] and index.page(None, None, "id6", 5) == []


def test_a_full_walk_sees_every_item_once_while_items_move(index):
    for i in range(30):
        index.put(item(f"id{i:02d}", S.REVIEW))
    seen, after = [], ""
    while True:
        chunk = index.page(S.REVIEW, None, after, 4)
        if not chunk:
            break
        seen += chunk
        after = chunk[-1]
        index.put(item(chunk[0], S.ACCEPTED))  # items leave the listing behind the cursor
    assert seen == [f"id{i:02d}" for i in range(30)]


# -- Celery queue depths --------------------------------------------------------------------------

def test_queue_depths_count_ready_prioritized_and_unacknowledged_messages(broker):
    app = create_celery(Settings(broker_url=broker))
    for _ in range(3):
        app.send_task("embedder.step", args=[{}], queue="embedder")  # no worker runs: they wait
    assert queue_depths(broker, ("embedder", "decoder")) == {"embedder": 3, "decoder": 0}

    # A prioritized message waits in a list of its own ("embedder\x06\x16<step>"): counted too.
    app.send_task("embedder.step", args=[{}], queue="embedder", priority=5)
    client = redis.Redis.from_url(broker)
    assert client.llen("embedder") == 3, "the prioritized message should be in a separate list"
    assert queue_depths(broker, ("embedder", "decoder")) == {"embedder": 4, "decoder": 0}

    # A message delivered and not acknowledged (a worker holds it, or died holding it) leaves the
    # queue's list for kombu's "unacked" hash; it is still work to do, so it still counts.
    with app.connection_for_read() as conn:
        message = conn.default_channel.basic_get("embedder", no_ack=False)
        assert message is not None and message.headers["task"] == "embedder.step"
        assert client.llen("embedder") == 2 and client.hlen("unacked") == 1
        assert queue_depths(broker, ("embedder", "decoder")) == {"embedder": 4, "decoder": 0}
    # Closing the channel without acking puts the message back in its queue: counted once, not twice.
    assert client.hlen("unacked") == 0 and client.llen("embedder") == 3
    assert queue_depths(broker, ("embedder", "decoder")) == {"embedder": 4, "decoder": 0}
    client.close()


def test_queue_depths_ignore_other_queues_and_unreadable_unacked_entries(broker):
    app = create_celery(Settings(broker_url=broker))
    app.send_task("decoder.step", args=[{}], queue="decoder")
    app.send_task("verifier.step", args=[{}], queue="verifier")  # a queue not asked about
    client = redis.Redis.from_url(broker)
    client.hset("unacked", "junk", b"not json")  # skipped, not a crash
    client.hset("unacked", "short", b"[1]")
    assert queue_depths(broker, ("embedder", "decoder")) == {"embedder": 0, "decoder": 1}
    client.close()
