"""Issue 26 on a real redis-server: two orchestrator processes claiming and deciding at once never
hand out one item twice and leave exact counts (equal to a rebuild's), page tokens refused when
forged, foreign or stale, and the metrics' label sets complete from the first scrape."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.errors import InvalidInput
from services.common.masks import MaskRecord, encode_rle
from services.common.queues import TaskOutcome
from services.common.steps import StepReport
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.common.metrics import EngineCollector
from services.common.storage import LocalStore
from services.orchestrator.cursor import make_token, read_token
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import MemoryIndex, RedisIndex
from services.orchestrator.model import QUEUE_BANDS, Item, ItemState, Stage, Stats
from services.common.review import ReviewSubmission

S, G = ItemState, Stage
N_ITEMS = 60
N_ROUTED = 20  # items at masks_decoded whose verify report both processes apply at once
DECODE_KEY, VERIFY_KEY = "stubs/decode.json", "stubs/verify.json"


class NoDispatch:
    def send(self, request) -> None:
        raise AssertionError(f"unexpected step {request}")


def seed(orch: Orchestrator, n: int) -> list[str]:
    """n settled-by-the-machine items waiting for a human: review, fix and stage-1 bands."""
    ids = []
    for i in range(n):
        state, score, stage = [(S.REVIEW, 0.7 + (i % 20) / 100, G.FULLY_AUTOMATIC),
                               (S.REJECTED, (i % 70) / 100, G.SEMI_AUTOMATIC),
                               (S.REVIEW, None, G.ASSISTED_MANUAL)][i % 3]
        item = Item(item_id=f"{i:024x}", source=f"im{i}.png", image_key=f"images/{i}", image_id=str(i),
                    stage=stage, height=8, width=8, score=score)
        item.state = state
        orch.save(item)
        ids.append(item.item_id)
    return ids


def seed_in_flight(orch: Orchestrator, n: int) -> list[str]:
    """n items decoded and waiting for their verify report (a score of 0.8: the review band)."""
    mask = MaskRecord(encode_rle(np.ones((8, 8), bool)), [0.0, 0.0, 8.0, 8.0], 64, 0.9, 0.95)
    orch.store.put(DECODE_KEY, DecodeOutput("", [GroundedPhrase("dog", False, [mask], True, "test")],
                                            grid_count=0).to_bytes())
    pairs = [PairVerdict("dog", False, 0.8, [Verdict("mask", "accept", 0.8, "test", "dog", [0])], 1)]
    orch.store.put(VERIFY_KEY, json.dumps(Verification(pairs, 0.8).to_json()).encode())
    ids = []
    for i in range(n):
        item = Item(item_id=f"f{i:023x}", source=f"f{i}.png", image_key=f"images/f{i}", image_id=f"f{i}",
                    height=8, width=8, done=["embed", "propose", "decode"],
                    outputs={"embed": "e", "propose": "p", "decode": DECODE_KEY})
        item.state = S.MASKS_DECODED
        orch.save(item)
        ids.append(item.item_id)
    return ids


def claimer(broker: str, root: str, who: str, routed: list[str], out) -> None:
    """One orchestrator process: apply the verify reports of ``routed`` (the other process applies
    the same ones at the same time, in the other order), then claim, then discard (or every third
    time skip), until none waits. A submit on an item the other process holds too would raise
    FailedPrecondition: exit code 1."""
    orch = Orchestrator(LocalStore(root), RedisIndex(broker), NoDispatch(), lease_s=120.0, audit_rate=0.0)
    for item_id in routed:
        orch.report(StepReport(item_id, "verify", TaskOutcome(ok=True, outputs={"verify_key": VERIFY_KEY})))
    claimed, skipped = [], 0
    while True:
        item = orch.next_review(who)
        if item is None:
            break
        claimed.append(item.item_id)
        if len(claimed) % 3 == 0 and skipped < 5:
            orch.desk.release(item.item_id, who, item.lease.token)
            skipped += 1
            continue
        orch.submit_review(ReviewSubmission(item.item_id, who, item.lease.token, False, [], 1.0))
    out.put(("done", who, claimed))


def test_two_orchestrator_processes_route_and_claim_every_item_once_and_counts_stay_exact(broker, tmp_path):
    root = tmp_path / "bucket"
    orch = Orchestrator(LocalStore(root), RedisIndex(broker), NoDispatch(), audit_rate=0.0)
    routed = seed_in_flight(orch, N_ROUTED)
    ids = seed(orch, N_ITEMS) + routed
    assert sum(orch.desk.waiting().values()) == N_ITEMS

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=claimer, args=(broker, str(root), who, order, out))
             for who, order in (("ann", routed), ("bob", routed[::-1]))]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    discarded = {}
    for kind, who, claimed in results:
        assert kind == "done", (kind, who, claimed)
    states = {i: orch.load(i).state for i in ids}
    assert set(states.values()) == {S.DISCARDED}
    for i in ids:  # each item discarded by exactly one annotator, the one whose lease it was
        reviews = orch.load(i).reviews
        assert len(reviews) == 1, (i, reviews)
        discarded[reviews[0].annotator] = discarded.get(reviews[0].annotator, 0) + 1
    assert sum(discarded.values()) == N_ITEMS + N_ROUTED and set(discarded) == {"ann", "bob"}
    for i in routed:  # each verify report applied once, though both processes applied it
        item = orch.load(i)
        assert item.done.count("verify") == 1 and [h[0] for h in item.history].count("VERIFIED") == 1
        assert len(item.mining) == 1 and item.score == 0.8

    counts, waiting, figures = orch.index.counts(), orch.desk.waiting(), orch.desk.figures()
    assert counts == ({"discarded": N_ITEMS + N_ROUTED},
                      {"fully_automatic": 20 + N_ROUTED, "semi_automatic": 20, "assisted_manual": 20})
    assert waiting == dict.fromkeys(QUEUE_BANDS, 0) and orch.desk.oldest_waiting_s() == 0.0
    assert {f.annotator: f.items for f in figures} == discarded
    orch.rebuild_index()  # counters rebuilt from the manifests equal the live ones
    assert (orch.index.counts(), orch.desk.waiting(), orch.desk.figures()) == (counts, waiting, figures)
    fresh = Orchestrator(LocalStore(root), MemoryIndex(), NoDispatch())
    fresh.rebuild_index()  # and a fresh count in another index agrees
    assert (fresh.index.counts(), [(f.annotator, f.items) for f in fresh.desk.figures()]) == (
        counts, [(f.annotator, f.items) for f in figures])


@pytest.fixture(params=["memory", "redis"])
def orch(request, tmp_path) -> Orchestrator:
    index = MemoryIndex() if request.param == "memory" else RedisIndex(request.getfixturevalue("broker"))
    return Orchestrator(LocalStore(tmp_path / "bucket"), index, NoDispatch(), audit_rate=0.0)


def test_band_counts_and_the_oldest_age_follow_claims_and_expired_leases(orch):
    seed(orch, 9)
    assert orch.desk.waiting() == {"review": 3, "fix": 3, "audit": 0, "stage1": 3}
    clock = [orch.desk.clock()]
    orch.desk.clock = lambda: clock[0]
    first = orch.next_review("ann")
    assert first.band == "review" and orch.desk.waiting()["review"] == 2
    clock[0] += orch.lease_s + 1  # the lease runs out: the item waits again, with its rank
    assert orch.desk.waiting()["review"] == 3
    assert orch.next_review("bob").item_id == first.item_id  # handed over, lowest score first


def test_page_tokens_walk_the_listing_and_refuse_forged_foreign_and_stale_ones(orch):
    ids = seed(orch, 7)
    seen, token = [], ""
    while True:
        items, token = orch.list_items(page_size=3, token=token)
        seen += [i.item_id for i in items]
        if not token:
            break
    assert seen == sorted(ids)
    _, token = orch.list_items(S.REVIEW, page_size=1)
    body, signature = token.split(".")
    cases = [  # (token, what the refusal names)
        (token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), "bad signature"),   # tampered signature
        (make_token(b"another deployment's key", ids[0], "state=REVIEW;stage="), "bad signature"),
        ("garbage", "is not one ListItems returned"),
        ("a" * 600, "is not one ListItems returned"),
    ]
    for bad, why in cases:
        with pytest.raises(InvalidInput, match=why):
            orch.list_items(S.REVIEW, page_size=1, token=bad)
    with pytest.raises(InvalidInput, match="made for the listing 'state=REVIEW;stage='"):
        orch.list_items(S.REJECTED, page_size=1, token=token)  # another filter's token
    key = orch.index.secret()
    old = make_token(key, ids[0], "state=;stage=", now=1_000.0)
    with pytest.raises(InvalidInput, match="stale"):
        orch.list_items(page_size=1, token=old)
    assert read_token(key, old, "state=;stage=", max_age_s=10.0, now=1_005.0) == ids[0]


def test_engine_metrics_export_zero_for_every_known_label_from_the_first_scrape():
    empty = Stats({}, {}, {}, 0, {}, 0.0)
    known = {"state": tuple(s.name.lower() for s in S), "stage": tuple(s.name.lower() for s in G),
             "band": QUEUE_BANDS, "queue": ("embedder", "orchestrator")}
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: empty, known))
    text = generate_latest(registry).decode()
    for state in known["state"]:
        assert f'dataengine_items{{state="{state}"}} 0.0' in text
    for stage in known["stage"]:
        assert f'dataengine_items_by_stage{{stage="{stage}"}} 0.0' in text
    for band in QUEUE_BANDS:
        assert f'dataengine_review_backlog{{band="{band}"}} 0.0' in text
    assert 'dataengine_queue_messages{queue="orchestrator"} 0.0' in text
