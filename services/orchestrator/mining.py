"""Active mining: the failure modes of an item the verifier sends to a human, and the report of
where the machine fails (``dataengine mining``).

``assess`` runs when an item is routed (engine._apply_verification) on what is at hand: the
phrases with their masks and verdicts, the grid-mask count, the image size and how many items of
the store carry each phrase (the index's phrase sets). The modes and their bars are
``services.common.failure_modes``; the item keeps them (``Item.failure_modes``), its queue
priority from them, and a ``MiningRecord`` per routing, so the report can say how the modes
changed from one decoder to the next on the same items.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

from services.common.failure_modes import FAILURE_MODES, MiningPolicy, MiningRecord

if TYPE_CHECKING:
    from services.orchestrator.model import Item, PhraseResult

WAITING = ("REVIEW", "REJECTED")


def phrase_modes(phrase: "PhraseResult", policy: MiningPolicy, image_pixels: int, carriers: int) -> list[str]:
    """The failure modes of one phrase, in FAILURE_MODES order. image_pixels: height * width (0:
    unknown, no small_objects); carriers: items of the store that carry the phrase."""
    modes = set()
    for v in phrase.verdicts:
        if v.check == "mask" and v.score < policy.low_mask_score:
            modes.add("low_mask_quality")
        elif v.check == "exhaustivity":
            if v.choice == "ungroundable":
                modes.add("ungroundable_phrase")
            elif v.choice != "accept" or v.score < policy.exhaustive_score:
                modes.add("exhaustivity_doubt")
        elif v.check == "hard_negative" and (v.choice == "present" or v.score < policy.negative_present_score):
            modes.add("hard_negative_present")
    if not phrase.is_negative:
        if not phrase.masks:
            modes.add("ungroundable_phrase")
        if image_pixels and any(m.area < policy.small_area_fraction * image_pixels for m in phrase.masks):
            modes.add("small_objects")
        if carriers < policy.rare_phrase_items:
            modes.add("rare_phrase")
    return [m for m in FAILURE_MODES if m in modes]


def assess(item: "Item", policy: MiningPolicy, grid_count: int, carriers: dict[str, int], at: float) -> MiningRecord:
    """The failure modes of ``item`` (routed, its phrases set) as a record of this routing at unix
    time ``at``; the caller stores it and sets ``item.failure_modes`` and ``item.priority`` from it."""
    per_phrase = {}
    for p in item.phrases:
        modes = phrase_modes(p, policy, item.height * item.width, carriers.get(p.phrase, 0))
        if modes:
            per_phrase[p.phrase] = modes
    instances = sum(len(p.masks) for p in item.phrases if not p.is_negative)
    crowded = instances >= policy.crowded_instances or grid_count >= policy.crowded_grid_masks
    found = {m for ms in per_phrase.values() for m in ms} | ({"crowded_scene"} if crowded else set())
    return MiningRecord(decoder=item.models.get("decoder", ""), at=at, state=item.state.name,
                        modes=[m for m in FAILURE_MODES if m in found], phrases=per_phrase)


# -- the report -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Routings counted: how many, how many went to a human, per failure mode, per phrase (items
    whose phrase had a mode) and per phrase and mode."""

    routed: int = 0
    to_human: int = 0
    by_mode: Counter = field(default_factory=Counter)
    by_phrase: Counter = field(default_factory=Counter)
    by_phrase_mode: dict[str, Counter] = field(default_factory=dict)

    def add(self, record: MiningRecord) -> None:
        self.routed += 1
        if record.state not in WAITING:
            return
        self.to_human += 1
        self.by_mode.update(record.modes)
        for phrase, modes in record.phrases.items():
            self.by_phrase[phrase] += 1
            self.by_phrase_mode.setdefault(phrase, Counter()).update(modes)

    def to_json(self, top: int) -> dict:
        return {"routed": self.routed, "to_human": self.to_human,
                "by_mode": {m: self.by_mode.get(m, 0) for m in FAILURE_MODES},
                "by_phrase": {p: {"items": n, "modes": dict(self.by_phrase_mode[p])}
                              for p, n in self.by_phrase.most_common(top)}}


@dataclass
class MiningReport:
    """waiting: the items waiting for a human now, by their present failure modes. decoders: per
    decoder id (oldest first, by its first routing), each item's latest routing by it. change: the
    items the last two decoders both routed, counted under each (None with one decoder)."""

    waiting: Tally
    decoders: dict[str, Tally]
    change: dict | None

    def to_json(self, top: int = 20) -> dict:
        return {"waiting": self.waiting.to_json(top), "decoders": {d: t.to_json(top) for d, t in self.decoders.items()},
                "since_last_model": self.change}


def report(items: Iterable["Item"], top: int = 20) -> MiningReport:
    """The mining report over ``items`` (every manifest of the store)."""
    waiting = Tally()
    latest: dict[str, dict[str, MiningRecord]] = {}  # decoder -> item id -> its latest record
    first: dict[str, float] = {}
    for item in items:
        if item.mining and item.state.name in WAITING and item.mining[-1].state in WAITING:
            waiting.add(item.mining[-1])
        for record in item.mining:
            latest.setdefault(record.decoder, {})[item.item_id] = record
            first[record.decoder] = min(first.get(record.decoder, record.at), record.at)
    order = sorted(latest, key=lambda d: (first[d], d))
    decoders = {}
    for decoder in order:
        tally = decoders[decoder] = Tally()
        for record in latest[decoder].values():
            tally.add(record)
    change = None
    if len(order) >= 2:
        before_id, now_id = order[-2], order[-1]
        both = sorted(set(latest[before_id]) & set(latest[now_id]))
        before, after = Tally(), Tally()
        for item_id in both:
            before.add(latest[before_id][item_id])
            after.add(latest[now_id][item_id])
        change = {"previous_decoder": before_id, "decoder": now_id, "items": len(both),
                  "to_human": {"before": before.to_human, "now": after.to_human},
                  "by_mode": {m: {"before": before.by_mode.get(m, 0), "now": after.by_mode.get(m, 0),
                                  "change": after.by_mode.get(m, 0) - before.by_mode.get(m, 0)}
                              for m in FAILURE_MODES},
                  "by_phrase": {p: {"before": before.by_phrase.get(p, 0), "now": after.by_phrase.get(p, 0)}
                                for p in sorted(set(before.by_phrase) | set(after.by_phrase),
                                                key=lambda p: -(before.by_phrase.get(p, 0)
                                                                + after.by_phrase.get(p, 0)))[:top]}}
    return MiningReport(waiting, decoders, change)
