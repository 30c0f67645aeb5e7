"""Training examples of the heuristic verifier's calibration (``calibration.Examples``), one reader
per source of human decisions. Each example's features are what the verifier computed (or would
compute, configured as the deployed one) for the unit the human judged; each carries its item id,
so the held-out split keeps all examples of an item on one side.
At the top, beside cli.py: it joins the orchestrator's manifests with the verifier's features.

- ``examples_from_store`` ("item" model): every manifest ``items/<id>/manifest.json`` whose item a
  human reviewed (state ACCEPTED or DISCARDED with ``reviewer`` set) after the verifier scored it
  (``score`` set; assisted-manual items go to a human unscored). Label: 1 accepted, 0 discarded.
  Features: ``HeuristicVerifier.item_features`` of what the verifier saw: the decode step's output
  when it is still stored (a reviewer may have replaced the manifest's phrases with corrected ones),
  else the manifest's phrases unless a human wrote them; the grid masks from ``grid_masks_key``.
- ``examples_from_mask_decisions`` ("mask" model): one example per mask a human accepted or
  rejected as the model proposed it (the studio's MV decisions), its features as a one-mask pair.
- ``examples_from_phrase_decisions`` ("exhaustivity" model): one example per EV decision on a
  phrase the heuristic gave an exhaustivity verdict: a positive the verifier saw without masks (an
  ungrounded label), scored from the ``top_k`` best grid masks; the features are that grid unit's.
  Label: 1 when the human marked the phrase exhaustive, 0 when not exhaustive or ungroundable.
- ``examples_from_jsonl`` ("item" model): one ``{FEATURE: number, ..., "accepted": bool}`` object
  per line (optional "item_id"; else the line is its own item).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from services.common.decoded import DecodeOutput
from services.common.errors import InvalidInput, NotFound
from services.common.jsonl import read_objects
from services.common.masks import MaskRecord
from services.common.storage import ObjectStore
from services.orchestrator.model import DECODE, Item, ItemState
from services.verifier.calibration import Examples
from services.verifier.core import PhrasePair, check_pairs
from services.verifier.heuristic import FEATURES, Evidence, HeuristicVerifier
from services.verifier.step import read_grid_masks

MANIFEST = re.compile(r"items/[^/]+/manifest\.json")


def _examples(rows: list, labels: list, ids: list, source: str, skipped: Counter) -> Examples:
    return Examples(np.array(rows, float).reshape(-1, len(FEATURES)), np.array(labels, bool), {source: len(rows)},
                    dict(skipped), np.array(ids, dtype=object))


def unreviewed_reason(item: Item) -> str:
    """Why a manifest's item is no training example ("" if it is one)."""
    if item.state not in (ItemState.ACCEPTED, ItemState.DISCARDED) or not item.reviewer:
        return "not reviewed by a human"
    if item.score is None:
        return "reviewed but never scored by the verifier"
    return ""


def _proposal(store: ObjectStore, item: Item) -> list[PhrasePair] | None:
    """The pairs the verifier scored: the decode output if stored, else the manifest's machine
    phrases; None when only a human's corrected phrases are left."""
    key = item.outputs.get(DECODE)
    if key:
        try:
            decoded = DecodeOutput.from_bytes(store.get(key), key)
            return [PhrasePair(p.phrase, p.masks, p.is_negative) for p in decoded.phrases]
        except NotFound:
            pass
    if any(p.provenance.startswith("human:") for p in item.phrases):
        return None
    return [PhrasePair(p.phrase, p.masks, p.is_negative) for p in item.phrases]


def _grid(store: ObjectStore, item: Item) -> list[MaskRecord]:
    """The item's grid masks; none when it has no key or they are gone (then a unit that needs
    the grid has no features, and the example is left out rather than given ones the verifier
    never saw)."""
    try:
        return read_grid_masks(store, item.grid_masks_key) if item.grid_masks_key else []
    except NotFound:
        return []


def _example(store: ObjectStore, item: Item, verifier: HeuristicVerifier) -> tuple[np.ndarray | None, str]:
    """(features, "") of a training item, or (None, why it is none)."""
    reason = unreviewed_reason(item)
    if reason:
        return None, reason
    try:
        pairs = _proposal(store, item)
        if pairs is None:
            return None, "phrases replaced by a human and the decode output is gone"
        grid = _grid(store, item)
        features = verifier.item_features(check_pairs(pairs, grid), grid)
    except InvalidInput:
        return None, "malformed decode output or masks"
    return (features, "") if features is not None else (None, "scored by rule (an ungroundable label)")


def _manifests(store: ObjectStore, skipped: Counter) -> Iterator[Item]:
    """Every item manifest in ``store``; an unreadable one is counted in ``skipped``."""
    for key in store.list("items/"):
        if not MANIFEST.fullmatch(key):
            continue
        try:
            doc = json.loads(store.get(key))
            yield Item.from_json(doc if isinstance(doc, dict) else {})
        except (ValueError, NotFound):  # InvalidInput is a ValueError; NotFound: deleted meanwhile
            skipped["malformed manifest"] += 1


def examples_from_store(store: ObjectStore, verifier: HeuristicVerifier) -> Examples:
    """One example per human-reviewed item in ``store``; ``verifier`` computes the features (it
    should be uncalibrated and configured as the deployed one, e.g. its ``top_k``)."""
    rows, labels, ids, skipped = [], [], [], Counter()
    for item in _manifests(store, skipped):
        features, reason = _example(store, item, verifier)
        if features is None:
            skipped[reason] += 1
            continue
        rows.append(features)
        labels.append(item.state == ItemState.ACCEPTED)
        ids.append(item.item_id)
    return _examples(rows, labels, ids, "store", skipped)


def examples_from_mask_decisions(store: ObjectStore, verifier: HeuristicVerifier) -> Examples:
    """One example per mask a human judged as the model proposed it (the studio's MV decisions,
    ``reviews[].mv`` of every manifest): the heuristic's features of that mask as its phrase's only
    mask; label: the human accepted it. Masks a human made or edited are no example of the model's
    (origin "human"); neither are audits (the first review is the label)."""
    rows, labels, ids, skipped = [], [], [], Counter()
    for item in _manifests(store, skipped):
        for record in item.reviews:
            if record.kind != "review":
                continue
            for decision in record.mv:
                if decision.get("origin") != "model":
                    skipped["mask made or edited by a human"] += 1
                    continue
                try:
                    mask = MaskRecord.from_json(decision["mask"])
                    pairs = check_pairs([PhrasePair(str(decision["phrase"]), [mask], False)], [])
                    features = verifier.item_features(pairs, [])
                except (InvalidInput, KeyError, TypeError, ValueError):
                    features = None
                if features is None:
                    skipped["malformed mask decision"] += 1
                    continue
                rows.append(features)
                labels.append(bool(decision.get("accept")))
                ids.append(item.item_id)
    return _examples(rows, labels, ids, "mask_decisions", skipped)


def _fold(phrase: object) -> str:
    """A phrase as the review desk normalises it (whitespace collapsed), case-folded."""
    return " ".join(str(phrase).split()).casefold()


def _ev_label(decision: dict) -> bool | None:
    """The human's EV decision as a label: exhaustive True -> True; False or ungroundable -> False;
    None when the entry is malformed or decided nothing."""
    exhaustive, ungroundable = decision.get("exhaustive"), decision.get("ungroundable", False)
    if exhaustive not in (True, False, None) or not isinstance(ungroundable, bool):
        return None
    if ungroundable:  # a label nobody can ground is the negative of its grounding
        return False
    return exhaustive


def examples_from_phrase_decisions(store: ObjectStore, verifier: HeuristicVerifier) -> Examples:
    """One example per EV decision (``reviews[].ev``, first reviews only, not audits) on a phrase
    the heuristic scored with an exhaustivity verdict: a positive the verifier saw without masks,
    whose item has grid masks. Features: ``verifier.grid_evidence`` of the item's grid (what that
    verdict is scored from); label: exhaustive (ungroundable counts as not). EV decisions on
    phrases the verifier saw with masks are left out: the heuristic makes no exhaustivity verdict
    on them (their masks are MV examples)."""
    rows, labels, ids, skipped = [], [], [], Counter()
    for item in _manifests(store, skipped):
        decisions = [d for r in item.reviews if r.kind == "review" for d in r.ev]
        if not decisions:
            continue
        if item.score is None:
            skipped["phrase decision on an item the verifier never scored"] += len(decisions)
            continue
        try:
            pairs = _proposal(store, item)
        except InvalidInput:
            skipped["malformed decode output or masks"] += len(decisions)
            continue
        grid = functools.cache(lambda item=item: _grid_unit(store, item, verifier))  # read once, if needed
        if pairs is None:
            skipped["phrases replaced by a human and the decode output is gone"] += len(decisions)
            continue
        machine = {_fold(p.phrase): p for p in pairs if not p.is_negative}
        for decision in decisions:
            features, reason = _ev_example(decision, machine, grid)
            if features is None:
                skipped[reason] += 1
                continue
            rows.append(features)
            labels.append(_ev_label(decision))
            ids.append(item.item_id)
    return _examples(rows, labels, ids, "phrase_decisions", skipped)


def _grid_unit(store: ObjectStore, item: Item, verifier: HeuristicVerifier) -> Evidence | None:
    """The unit an ungrounded label's exhaustivity verdict is scored from; None without grid masks."""
    masks = _grid(store, item)
    check_pairs([], masks)  # one size and finite scores, as the verifier checks them
    return verifier.grid_evidence(masks)


def _ev_example(decision: object, machine: dict[str, PhrasePair],
                grid) -> tuple[np.ndarray | None, str]:
    """(features, "") of one EV decision, or (None, why it is no example). grid: () -> the grid
    unit (``Evidence``) or None; may raise ``InvalidInput`` for malformed grid masks."""
    if not isinstance(decision, dict) or "phrase" not in decision or _ev_label(decision) is None:
        return None, "malformed phrase decision"
    pair = machine.get(_fold(decision["phrase"]))
    if pair is None:
        return None, "phrase decision on a phrase the verifier did not score (added or renamed by a human)"
    if pair.masks:
        return None, "phrase decision on a phrase with masks (the heuristic makes no exhaustivity verdict on it)"
    try:
        unit: Evidence | None = grid()
    except InvalidInput:
        return None, "malformed decode output or masks"
    if unit is None:
        return None, "phrase decision on a label scored ungroundable by rule (no grid masks)"
    return unit.features, ""


def examples_from_jsonl(path: Path) -> Examples:
    """Examples from a JSONL file of ``{FEATURE: number, ..., "accepted": bool}`` objects (blank
    lines skipped; an optional string "item_id" places records of one item on one side of the
    held-out split, else each line is its own item); a bad line is ``InvalidInput`` naming
    ``path:line``."""
    rows, labels, ids = [], [], []
    for where, record in read_objects(path, "training items"):
        if not isinstance(record.get("accepted"), bool):
            raise InvalidInput(f"{where} needs an object with 'accepted' (true or false), "
                               f"got {json.dumps(record):.100}")
        row = []
        for name in FEATURES:
            value = record.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidInput(f"{where} needs feature {name!r} as a finite number, got {value!r:.50} "
                                   f"(features: {', '.join(FEATURES)})")
            row.append(float(value))
        rows.append(row)
        labels.append(record["accepted"])
        ids.append(record["item_id"] if isinstance(record.get("item_id"), str) else where)
    return _examples(rows, labels, ids, "jsonl", Counter())
