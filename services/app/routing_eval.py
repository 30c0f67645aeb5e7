"""How well the verifier's routing agrees with human decisions: precision and recall of the
automatic decisions (auto-accept, auto-reject) against what humans decided on the same units.
At the top, beside cli.py: it reads the orchestrator's routing and manifests for the verifier.

Input: JSONL, one routed unit (an item, or an image–noun-phrase pair) per line:

    {"score": 0.93, "human": "accept"}
    {"routed": "review", "accepted": false, "id": "item-17"}

- ``score``: the verifier score in [0, 1], routed with the thresholds (``routing.Thresholds``:
  ``s >= accept`` accepted, ``review <= s < accept`` review, below rejected); or ``routed``: the
  state the unit was routed to (``accepted``, ``review`` or ``rejected``), used when there is no
  score (so a threshold sweep needs scores).
- the human decision: ``human`` (``accept``/``accepted`` or ``reject``/``rejected``/``discard``/
  ``discarded``) or ``accepted`` (true/false, as in the ``dataengine calibrate`` records).
- ``id``: optional, for error messages only.

Report (``None`` where a ratio has no denominator):
- auto_accept: precision = routed accepted and human accepted / routed accepted (how clean the
  automatic accepts are); recall = the same / human accepted (how much of the good data needed no
  human).
- auto_reject: likewise for routed rejected against human rejected.
- routed: per state, how many units and how many of them humans accepted or rejected.
- review_fraction: the share routed to review (human work), automated_accuracy: the share of the
  automatic decisions (accepted or rejected) that the human agreed with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from services.common.errors import InvalidInput
from services.common.jsonl import read_objects
from services.common.storage import ObjectStore
from services.orchestrator.model import ItemState
from services.orchestrator.routing import Thresholds

ROUTED = (ItemState.ACCEPTED, ItemState.REVIEW, ItemState.REJECTED)
HUMAN_ACCEPT = {"accept", "accepted"}
HUMAN_REJECT = {"reject", "rejected", "discard", "discarded"}


@dataclass(frozen=True)
class Decision:
    """One unit: where routing sent it, and whether the human accepted it."""

    routed: ItemState
    accepted: bool


def _human(record: dict, where: str) -> bool:
    if "human" in record:
        value = record["human"]
        text = value.strip().lower() if isinstance(value, str) else None
        if text in HUMAN_ACCEPT | HUMAN_REJECT:
            return text in HUMAN_ACCEPT
        raise InvalidInput(f"{where}: 'human' must be accept or reject (or accepted, rejected, discarded), "
                           f"got {value!r:.50}")
    if isinstance(record.get("accepted"), bool):
        return record["accepted"]
    raise InvalidInput(f"{where}: needs the human decision, 'human' (accept or reject) or 'accepted' "
                       f"(true or false), got {json.dumps(record)[:100]}")


def _routed(record: dict, thresholds: Thresholds, where: str) -> ItemState:
    if "score" in record:
        score = record["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise InvalidInput(f"{where}: 'score' must be a number in [0, 1], got {score!r:.50}")
        try:
            return thresholds.route(float(score))
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc}") from None
    if "routed" in record:
        try:
            state = ItemState.parse(record["routed"]) if isinstance(record["routed"], str) else None
        except InvalidInput:
            state = None
        if state not in ROUTED:
            raise InvalidInput(f"{where}: 'routed' must be accepted, review or rejected, got {record['routed']!r:.50}")
        return state
    raise InvalidInput(f"{where}: needs 'score' (the verifier score) or 'routed' (accepted, review or rejected), "
                       f"got {json.dumps(record)[:100]}")


def load_decisions(path: Path | str, thresholds: Thresholds) -> list[Decision]:
    """The decisions of a JSONL file (blank lines skipped); a bad line is ``InvalidInput`` naming
    ``path:line`` (and the record's ``id`` when it has one)."""
    decisions = []
    for where, record in read_objects(path, "routing decisions"):
        if "id" in record:
            where += f" (id {record['id']!r:.50})"
        decisions.append(Decision(_routed(record, thresholds, where), _human(record, where)))
    return decisions


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def routing_report(decisions: Sequence[Decision], thresholds: Thresholds) -> dict:
    """Precision and recall of auto-accept and auto-reject against the human decisions (module
    docstring); ``InvalidInput`` when there is no decision at all."""
    if not decisions:
        raise InvalidInput("no routing decisions to evaluate: no record, and no item reviewed by a human "
                           "after the verifier scored it")
    table = {state: {"n": 0, "human_accepted": 0, "human_rejected": 0} for state in ROUTED}
    for d in decisions:
        row = table[d.routed]
        row["n"] += 1
        row["human_accepted" if d.accepted else "human_rejected"] += 1
    accepted, rejected = table[ItemState.ACCEPTED], table[ItemState.REJECTED]
    human_accepted = sum(row["human_accepted"] for row in table.values())
    human_rejected = len(decisions) - human_accepted
    automatic = accepted["n"] + rejected["n"]
    return {
        "n": len(decisions), "human_accepted": human_accepted, "human_rejected": human_rejected,
        "thresholds": {"accept": thresholds.accept, "review": thresholds.review},
        "auto_accept": {"precision": _ratio(accepted["human_accepted"], accepted["n"]),
                        "recall": _ratio(accepted["human_accepted"], human_accepted)},
        "auto_reject": {"precision": _ratio(rejected["human_rejected"], rejected["n"]),
                        "recall": _ratio(rejected["human_rejected"], human_rejected)},
        "routed": {state.name.lower(): row for state, row in table.items()},
        "review_fraction": table[ItemState.REVIEW]["n"] / len(decisions),
        "automated_accuracy": _ratio(accepted["human_accepted"] + rejected["human_rejected"], automatic),
    }


def decisions_from_store(store: ObjectStore, thresholds: Thresholds) -> list[Decision]:
    """One decision per item a human reviewed after the verifier scored it (the items
    ``dataengine calibrate`` trains on): routed as ``thresholds`` route its score in stage 3,
    accepted when the human accepted it. Items nobody reviewed carry no human decision."""
    from services.orchestrator.exports import iter_items  # the orchestrator's manifest reader
    from services.app.calibration_data import unreviewed_reason

    return [Decision(thresholds.route(item.score), item.state == ItemState.ACCEPTED)
            for item in iter_items(store, (ItemState.ACCEPTED, ItemState.DISCARDED))
            if not unreviewed_reason(item)]


def evaluate_routing(thresholds: Thresholds, path: Path | str | None = None,
                     store: ObjectStore | None = None) -> dict:
    """``routing_report`` of the decisions in the JSONL file ``path`` and/or the reviewed items
    of ``store``."""
    decisions, sources = [], {}
    if path is not None:
        decisions += load_decisions(path, thresholds)
        sources["items"] = len(decisions)
    if store is not None:
        reviewed = decisions_from_store(store, thresholds)
        decisions += reviewed
        sources["store"] = len(reviewed)
    return {**routing_report(decisions, thresholds), "sources": sources}
