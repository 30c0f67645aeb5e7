"""The orchestrator's admin walks over every manifest: rebuild the index, resume after Redis lost
its data or a run was interrupted, and rerun the items waiting for a human with a new decoder.

They stream: manifests are read ``read_workers`` at a time in key order with memory flat in the
store's size, and the index is written in batches (``Index.put_many``). ``Maintenance`` is a part
of ``Orchestrator`` (engine.py), which gives it ``store``, ``index``, ``mining``, ``load``,
``save`` and ``_dispatch``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from services.common.errors import InvalidInput
from services.orchestrator.exports import Shard, iter_items
from services.orchestrator.index import ids, now
from services.orchestrator.model import VERIFY, Item, ItemState
from services.orchestrator.review import put_review_events

log = logging.getLogger(__name__)


@dataclass
class RerunSummary:
    """What ``Orchestrator.rerun`` did: the item ids sent through again, and per reason how many
    it left alone."""

    rerun: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        # "alice is reviewing it" and "bob is reviewing it" are one reason in a report.
        key = "a human is reviewing it" if why.endswith(" is reviewing it") else why
        self.skipped[key] = self.skipped.get(key, 0) + 1

    def to_json(self) -> dict:
        return {"rerun": len(self.rerun), "item_ids": list(self.rerun), "skipped": dict(self.skipped)}


def positives(item: Item) -> list[str]:
    """The item's positive phrases, each once, in order (what the phrase carriers count)."""
    return list(dict.fromkeys(p.phrase for p in item.phrases if not p.is_negative))


Part = tuple[int, int]  # (this part, of how many): a walk split across processes by item-id shard
WHOLE: Part = (0, 1)


class Maintenance:
    def manifests(self, part: Part = WHOLE) -> Iterator[Item]:
        """Every item of ``part`` (``shard_of`` its id, as exports shard), read from its manifest in
        key order by the exports' own stream (``read_workers`` at a time, memory flat in the
        store's size); unreadable manifests are skipped with a warning. For admin walks."""
        return iter_items(self.store, shard=Shard(*part), window=self.read_workers)

    def rebuild_index(self, on_item: Callable[[Item], None] | None = None, part: Part = WHOLE,
                      clear: bool = True) -> int:
        """Rebuild the index (states, stages, the review queue, annotator figures, phrase sets)
        from the manifests, streamed in batches; ``on_item`` sees every unfinished item after it
        is indexed. ``part``: only that share of the items, after the caller cleared the index once
        (``clear=False``; ``dataengine reconcile --workers K`` runs K parts at once). Returns how
        many items were indexed."""
        if clear:
            self.index.clear()
        batch: list[Item] = []
        count = 0

        def flush() -> None:
            self.index.put_many(batch)
            self.index.put_phrases_many((i.item_id, positives(i)) for i in batch if VERIFY in i.done)
            for item in batch:
                put_review_events(self.index, item)
                if on_item is not None and not item.settled:
                    on_item(item)
            batch.clear()

        for item in self.manifests(part):
            if item.priority is not None:  # the weights may have changed since it was routed
                item.priority = round(self.mining.urgency(item.score or 0.0, item.failure_modes), 6)
            batch.append(item)
            count += 1
            if len(batch) == 1000:
                flush()
        flush()
        return count

    def resume(self, part: Part = WHOLE, clear: bool = True) -> int:
        """Rebuild the index from the manifests and re-dispatch every unfinished item's pending
        steps (after Redis lost its data, or when an interrupted run starts again). Returns how
        many items were re-dispatched. ``part``, ``clear``: as ``rebuild_index``."""
        unfinished = [0]

        def restart(item: Item) -> None:
            unfinished[0] += 1
            self._dispatch(item)

        self.rebuild_index(restart, part, clear)
        return unfinished[0]

    def rerun(self, states: Sequence[ItemState], decoder_id: str = "", reason: str = "") -> RerunSummary:
        """Decode and verify again every item in ``states`` (review, rejected) that no human settled
        or holds (``Item.rerun_refusal``), e.g. with a newly promoted decoder; each is routed anew.

        decoder_id: the decoder the decode workers now run: items whose masks it made already are
        left as they are (a second rerun after the same promotion redoes nothing). ``""``: all.
        """
        summary = RerunSummary()
        allowed = {ItemState.REVIEW, ItemState.REJECTED}
        wrong = [s.name.lower() for s in states if s not in allowed]
        if wrong or not states:
            raise InvalidInput(f"rerun takes --state review and/or --state rejected, got {wrong or 'none'}")
        for state in dict.fromkeys(states):
            for item_id in ids(self.index, state):  # a cursor: items leaving the state behind it do not shift it
                with self.index.lock(item_id):
                    item = self.load(item_id)
                    refusal = item.rerun_refusal(now())
                    if not refusal and decoder_id and item.models.get("decoder") == decoder_id:
                        refusal = f"its masks are decoder {decoder_id}'s already"
                    if refusal:
                        summary.skip(refusal)
                        continue
                    item.rerun(reason or f"rerun with decoder {decoder_id or 'in service'}", now())
                    self.save(item)
                summary.rerun.append(item_id)
                self._dispatch(item)
        return summary

