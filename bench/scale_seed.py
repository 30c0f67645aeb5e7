"""Seeding for bench_scale: item manifests written straight into the store, no models.

Each item is a ``services.orchestrator.model.Item`` built here (deterministically from its number)
and saved as ``Orchestrator.save`` does: ``json.dumps(item.to_json())`` under ``manifest_key`` in
a ``LocalStore``, then put into the Redis index (``Index.put_many`` when the index has it, else
``put`` per item), its positive phrases into the phrase sets (``put_phrases``, as a verify report
or a reconcile does), a dead letter for each failed item and, where the index tracks steps in
flight (``track``), the verify step of each item in flight, as sent at seeding time. Worker
processes (spawned: the parent may be serving gRPC) write ranges of items in parallel.

The mix (by a seeded draw per item): 8% in flight at masks_decoded (decoded, awaiting their
verify report: bench_scale routes them), 1% failed with a dead letter, 31% accepted (score in
[0.9, 1]), 38% in review ([0.7, 0.9), a tenth of them stage 2) and 22% in the fix queue (below
0.7): 60% waiting for a human, each with failure modes and a queue priority. A verified item
has 1-3 positive phrases out of a Zipf-like vocabulary of 5,000 (sometimes a hard negative),
1-3 small RLE masks (pycocotools, from a pool made once) and verdicts; a manifest is ~2 KB.
"""

from __future__ import annotations

import bisect
import json
import random
import time
from functools import lru_cache

import numpy as np

from services.common import keys
from services.common.decoded import DecodeOutput, GroundedPhrase
from services.common.failure_modes import FAILURE_MODES, MiningPolicy, MiningRecord
from services.common.masks import MaskRecord, encode_rle, sa1b_document
from services.common.storage import LocalStore
from services.common.verdicts import PairVerdict, Verdict, Verification
from services.orchestrator.model import (DECODE, EMBED, PROPOSE, VERIFY, Item, ItemState, PhraseResult, Stage,
                                         item_id_for, manifest_key)

H, W = 480, 640
ENCODER, DECODER = "sam1-vit_b-stub", "sam1-vit_b-stub-decoder"
GRID_KEY = keys.masks_key(DECODER, "stub", "grid")
DECODE_KEY = "stubs/decode.json"
VERIFY_SCORES = (0.95, 0.8, 0.5)  # one stub verify output per destination: accepted, review, fix
SHARES = ((ItemState.MASKS_DECODED, 0.08), (ItemState.FAILED, 0.01), (ItemState.ACCEPTED, 0.31),
          (ItemState.REVIEW, 0.38), (ItemState.REJECTED, 0.22))
_POLICY = MiningPolicy()
_CUTS = list(np.cumsum([s for _, s in SHARES]))
NOUNS = ("person car dog cat tree chair table cup bottle bird boat sign window door lamp book plant bag shoe "
         "bicycle bus truck horse cow sheep clock vase bench kite umbrella pizza laptop phone fence roof").split()
ADJ = ("red blue green white black small large wooden metal striped old new plastic glass round tall short "
       "open closed dirty shiny folded parked broken empty").split()


def item_id(i: int) -> str:
    return item_id_for("bench-scale", f"img-{i:09d}")


def verify_key(k: int) -> str:
    return f"stubs/verify-{k}.json"


@lru_cache(maxsize=1)
def vocabulary() -> tuple[list[str], list[float]]:
    """5,000 phrases and their cumulative Zipf weights (phrase n drawn with weight 1 / (n + 1))."""
    words = [f"{a} {n}{'' if r == 0 else f' {r}'}" for r in range(5) for a in ADJ for n in NOUNS][:5000]
    cdf = list(np.cumsum([1.0 / (n + 1) for n in range(len(words))]))
    return words, [c / cdf[-1] for c in cdf]


@lru_cache(maxsize=1)
def mask_pool() -> list[MaskRecord]:
    """64 small masks (rectangles and ellipses of 8-64 px) on an H x W image, as the decoder writes them."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    pool = []
    for n in range(64):
        h, w = rng.integers(8, 64, 2)
        y, x = rng.integers(0, H - h), rng.integers(0, W - w)
        if n % 2:
            m = ((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1
        else:
            m = np.zeros((H, W), bool)
            m[y:y + h, x:x + w] = True
        ys, xs = np.nonzero(m)
        pool.append(MaskRecord(encode_rle(m), [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1),
                                               float(np.ptp(ys) + 1)], int(m.sum()),
                               round(float(rng.uniform(0.6, 1)), 4), round(float(rng.uniform(0.8, 1)), 4),
                               [[float(xs.mean()), float(ys.mean())]], [0.0, 0.0, float(W), float(H)],
                               f"sam1:{DECODER}"))
    return pool


def write_stubs(store: LocalStore) -> None:
    """The decode output, grid masks and verify outputs every in-flight item shares (written once)."""
    pool = mask_pool()
    store.put(GRID_KEY, json.dumps(sa1b_document("stub", (H, W), pool[:5])).encode())
    phrases = [GroundedPhrase("red person", False, pool[:2], True, "ontology"),
               GroundedPhrase("wooden table", False, pool[2:3], True, "ontology"),
               GroundedPhrase("open umbrella", True, [], False, "taxonomy")]
    store.put(DECODE_KEY, DecodeOutput(GRID_KEY, phrases, grid_count=5).to_bytes())
    for k, score in enumerate(VERIFY_SCORES):
        pairs = [PairVerdict(p.phrase, p.is_negative, score,
                             [Verdict("hard_negative" if p.is_negative else "mask", "accept", score, "heuristic",
                                      p.phrase, list(range(len(p.masks))))], len(p.masks)) for p in phrases]
        store.put(verify_key(k), json.dumps(Verification(pairs, score).to_json()).encode())


def build_item(i: int, now: float) -> Item:
    """Item number ``i`` (the same every run), in the state the mix draws for it."""
    rng = random.Random(i)
    state = SHARES[min(bisect.bisect_right(_CUTS, rng.random()), len(SHARES) - 1)][0]
    image_id = keys.sha256_hex(f"bench-scale-{i}".encode())
    iid = item_id(i)
    stage = Stage.SEMI_AUTOMATIC if state == ItemState.REVIEW and rng.random() < 0.1 else Stage.FULLY_AUTOMATIC
    t = now - rng.uniform(60, 30 * 86400)
    item = Item(item_id=iid, source=f"s3://bench-scale/images/{i:09d}.jpg", image_key=keys.image_key(image_id),
                image_id=image_id, stage=stage, height=H, width=W, known_labels=["person", "table"],
                history=[[s.name, round(t + k * 2.5, 3)] for k, s in enumerate(
                    (ItemState.INGESTED, ItemState.EMBEDDED, ItemState.CONCEPTS_PROPOSED, ItemState.MASKS_DECODED))],
                amg_params={})
    item.outputs = {EMBED: keys.embedding_key(ENCODER, image_id, (0, 0, W, H)),
                    PROPOSE: keys.step_key(iid, PROPOSE), DECODE: DECODE_KEY}
    item.done = [EMBED, PROPOSE, DECODE]
    item.grid_masks_key = GRID_KEY
    item.models = {"encoder": ENCODER, "decoder": DECODER}
    item.timings = {EMBED: round(rng.uniform(0.2, 0.6), 3), PROPOSE: round(rng.uniform(0.5, 2), 3),
                    DECODE: round(rng.uniform(0.3, 1), 3)}
    item.state = ItemState.MASKS_DECODED
    if state == ItemState.MASKS_DECODED:
        return item
    if state == ItemState.FAILED:
        item.fail("verify: the verifier endpoint timed out 5 times (dead letter)")
        return item
    score = {ItemState.ACCEPTED: rng.uniform(0.9, 1.0), ItemState.REVIEW: rng.uniform(0.7, 0.9)}.get(
        state, rng.uniform(0.05, 0.7))
    words, cdf = vocabulary()
    pool = mask_pool()
    positives = list(dict.fromkeys(words[min(bisect.bisect_left(cdf, rng.random()), len(words) - 1)]
                                   for _ in range(rng.randint(1, 3))))
    masks = [0] * len(positives)
    for n in range(rng.randint(1, 3)):  # 1-3 masks in all, the first phrase grounded
        masks[0 if n == 0 else rng.randrange(len(positives))] += 1
    for n, phrase in enumerate(positives):
        own = [pool[rng.randrange(len(pool))] for _ in range(masks[n])]
        s = round(min(1.0, max(0.0, score + rng.uniform(-0.05, 0.05))), 4)
        item.phrases.append(PhraseResult(phrase, False, own, [Verdict("mask", "accept", s, "heuristic", phrase,
                                                                      list(range(len(own))))],
                                         s, "ontology", state, bool(own)))
    if rng.random() < 0.3:
        item.phrases.append(PhraseResult("open umbrella", True, [], [Verdict("hard_negative", "absent", 0.9)],
                                         0.9, "taxonomy", state))
    item.outputs[VERIFY] = keys.step_key(iid, VERIFY)
    item.done.append(VERIFY)
    item.timings[VERIFY] = round(rng.uniform(0.3, 1.5), 3)
    item.score = round(score, 4)
    item.move(ItemState.VERIFIED)
    reason = "" if state == ItemState.ACCEPTED else f"verifier score {score:.3f} needs a human check"
    item.move(state, reason)
    item.history[-2:] = [[ItemState.VERIFIED.name, round(t + 12, 3)], [state.name, round(t + 12, 3)]]
    modes = sorted(rng.sample(FAILURE_MODES, rng.choice((0, 1, 1, 2)))) if state != ItemState.ACCEPTED else []
    if state != ItemState.ACCEPTED:
        item.failure_modes = modes
        item.priority = round(_POLICY.urgency(score, modes), 6)
    item.mining = [MiningRecord(DECODER, round(t + 12, 3), state.name, modes, {})]
    return item


def seed_range(job: tuple[str, str, int, int]) -> dict:
    """Write items [start, stop) under ``root`` and into the Redis index at ``url``; returns counts,
    manifest bytes and the numbers of the items left in flight (what bench_scale routes)."""
    try:
        from services.orchestrator.redis_index import RedisIndex
    except ImportError:  # before the index had its own module
        from services.orchestrator.index import RedisIndex

    root, url, start, stop = job
    store, index = LocalStore(root), RedisIndex(url)
    now, size, in_flight, by_state = time.time(), 0, [], {}
    for lo in range(start, stop, 1000):
        batch = [build_item(i, now) for i in range(lo, min(stop, lo + 1000))]
        for n, item in enumerate(batch):
            data = json.dumps(item.to_json()).encode()
            size += len(data)
            store.put(manifest_key(item.item_id), data, content_type="application/json")
            by_state[item.state.name] = by_state.get(item.state.name, 0) + 1
            if item.state == ItemState.MASKS_DECODED:
                in_flight.append(lo + n)
        if hasattr(index, "put_many"):
            index.put_many(batch)
        else:
            for item in batch:
                index.put(item)
        for item in batch:
            if VERIFY in item.done:
                index.put_phrases(item.item_id, list(dict.fromkeys(p.phrase for p in item.phrases
                                                                   if not p.is_negative)))
            if item.state == ItemState.MASKS_DECODED and hasattr(index, "track"):  # its verify step in flight
                index.track(item.item_id, VERIFY, round(now, 3))  # sent now (as Orchestrator.send)
            if item.state == ItemState.FAILED:
                index.add_dead_letter({"item_id": item.item_id, "step": VERIFY, "reason": item.reason,
                                       "attempts": 5, "at": round(now, 3)})
    getattr(getattr(index, "redis", None), "close", lambda: None)()
    return {"items": stop - start, "bytes": size, "in_flight": in_flight, "by_state": by_state}
