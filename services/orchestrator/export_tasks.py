"""Celery task ``orchestrator.export_shard`` (queue ``orchestrator``): one shard of a sharded export
into the object store, under ``exports/``; and the sender that queues every unfinished shard of an
export and waits for their progress records, for workers on other machines.

Resumable as local exports are (shards.py): a task for a shard whose object and progress record
are in place returns at once, so a redelivery (its worker was killed) or a second send redoes only
what is missing. Thin over ``shards.run_shard``; errors are outcomes as for every service task
(``common.core_tasks``): storage trouble retried with backoff, bad input an ``ok: false`` outcome.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from celery import Celery

from services.common.core_tasks import MAX_ATTEMPTS, register_core_task
from services.common.errors import DataEngineError, InvalidInput
from services.common.storage import ObjectStore
from services.orchestrator.shards import OnShard, ShardedExport, ShardRecord, StoreTarget, run_shard

log = logging.getLogger(__name__)

EXPORT_SHARD_TASK = "orchestrator.export_shard"


def register_export_tasks(app: Celery, store_factory: Callable[[], ObjectStore],
                          max_attempts: int = MAX_ATTEMPTS) -> None:
    """Register ``orchestrator.export_shard`` on ``app``; ``store_factory`` gives the store exported
    (and written to)."""

    def export_shard(export: dict, prefix: str, shard: int) -> dict:
        """export: ``ShardedExport.to_json()``; prefix: the export's prefix under ``exports/``;
        shard: its index. Outputs: ``key`` and ``record_key`` of the shard, ``written`` (False: it
        was done already), ``bytes``, ``sha256`` and the shard's counts."""
        if not isinstance(export, dict) or isinstance(shard, bool) or not isinstance(shard, int):
            raise InvalidInput(f"export must be an object and shard an integer, got {export!r:.200}, {shard!r}")
        spec, target = ShardedExport.from_json(export), StoreTarget(prefix)
        if not 0 <= shard < spec.shards:
            raise InvalidInput(f"shard {shard} is not in [0, {spec.shards})")
        record, written = run_shard(store_factory(), target, spec, shard)
        log.info("export shard %d of %d %s", shard, spec.shards, "written" if written else "was done")
        return {"key": target.key(record.file), "record_key": target.record_key(shard), "written": written,
                "bytes": record.bytes, "sha256": record.sha256, **record.summary.to_json()}

    register_core_task(app, EXPORT_SHARD_TASK, export_shard, max_attempts)


def export_shards_queued(app: Celery, store: ObjectStore, target: StoreTarget, export: ShardedExport,
                         on_shard: OnShard | None = None, poll_s: float = 1.0,
                         on_sent: Callable[[int], None] | None = None) -> dict:
    """Send one ``orchestrator.export_shard`` task per unfinished shard, wait until each is done
    and its progress record is in the store, then write the index; returns it (shards.py). The
    store is listed once here, into the plan the tasks read their shard's keys from.

    on_shard: called with (record, written by a task now) as shards are found done or finish;
    on_sent: with the number of tasks sent. Raises ``DataEngineError`` naming every shard that
    failed (after the others finished; a new call retries only those). Waits as long as the tasks
    take: interrupted, the tasks go on, and a new call collects what they finished.
    """
    target.begin(store, export)
    done: dict[int, ShardRecord] = {}
    for index in range(export.shards):
        record = target.finished(store, export, index)
        if record is not None:
            done[index] = record
            if on_shard is not None:
                on_shard(record, False)
    if len(done) < export.shards and export.shards > 1:
        target.plan(store, export)  # the tasks read their keys from it instead of listing the store each
    results = {i: app.send_task(EXPORT_SHARD_TASK, args=[export.to_json(), target.prefix, i])
               for i in range(export.shards) if i not in done}
    if on_sent is not None:
        on_sent(len(results))
    failures: dict[int, str] = {}
    while results:
        for index, result in list(results.items()):
            if not result.ready():
                continue
            del results[index]
            outcome = result.get(propagate=False)  # a failed task's exception, not raised
            result.forget()
            if not (isinstance(outcome, dict) and outcome.get("ok")):
                failures[index] = (str(outcome.get("reason")) if isinstance(outcome, dict)
                                   else f"{type(outcome).__name__}: {outcome}")
                continue
            record = target.finished(store, export, index)
            if record is None:
                failures[index] = "its task reported done, but its progress record is not in the store"
                continue
            done[index] = record
            if on_shard is not None:
                on_shard(record, True)
        if results:
            time.sleep(poll_s)
    if failures:
        listed = "; ".join(f"shard {i}: {reason}" for i, reason in sorted(failures.items())[:10])
        raise DataEngineError(f"{len(failures)} of {export.shards} shards failed ({listed}); "
                              "run the export again to retry them (finished shards are kept)")
    return target.write_index(store, export, [done[i] for i in range(export.shards)])

