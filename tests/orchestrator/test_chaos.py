"""The chaos run's orchestrator findings (issue 13), reproduced by killing an orchestrator process at
the exact point with SIGKILL, over a real redis-server and a store on disk:
- killed between writing an item's manifest and updating the index: the redelivered report sets
  the index to the manifest (before, it saw a settled manifest, returned early, and the index kept
  the old state until a reconcile);
- killed while holding an item's lock: the next orchestrator gets it within the lock's short TTL
  (renewed while held), not after the 60 s the longest report may wait."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from services.common.queues import TaskOutcome
from services.common.steps import StepReport
from services.common.storage import LocalStore
from services.orchestrator.engine import Orchestrator
from services.orchestrator.index import RedisIndex
from services.orchestrator.model import EMBED, Item, ItemState, Stage
from services.orchestrator.index import ids
from tests.orchestrator.test_review import NoDispatch

pytestmark = pytest.mark.slow

REPORT = StepReport("0" * 23 + "1", EMBED, TaskOutcome(True, {"embedding_key": "embeddings/m/x/0_0_56_40.npz",
                                                               "image_id": "x", "height": 40, "width": 56}))

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from services.common.steps import StepReport
    from services.common.storage import LocalStore
    from services.orchestrator.engine import Orchestrator
    from services.orchestrator.index import RedisIndex

    root, url, what, report = sys.argv[1], sys.argv[2], sys.argv[3], StepReport.from_json(json.loads(sys.argv[4]))
    index = RedisIndex(url)
    orch = Orchestrator(LocalStore(root), index, dispatcher=None)
    if what == "after-manifest":
        real_put = index.put
        index.put = lambda item: os.kill(os.getpid(), signal.SIGKILL)  # the manifest is written, the index not
        orch.report(report)
    else:
        with index.lock(report.item_id):
            print("locked", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
""")


def child(tmp_path, broker: str, what: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "store"), broker, what,
                             json.dumps(REPORT.to_json())], stdout=subprocess.PIPE, text=True)


def orchestrator(tmp_path, broker: str) -> Orchestrator:
    orch = Orchestrator(LocalStore(tmp_path / "store"), RedisIndex(broker), NoDispatch())
    orch.save(Item(item_id=REPORT.item_id, source="a.png", image_key="images/x", image_id="x",
                   stage=Stage.ASSISTED_MANUAL))
    return orch


def test_a_report_applied_again_after_a_kill_sets_the_index_to_the_manifest(tmp_path, broker):
    orch = orchestrator(tmp_path, broker)
    proc = child(tmp_path, broker, "after-manifest")
    assert proc.wait(timeout=60) == -9
    assert orch.load(REPORT.item_id).state == ItemState.REVIEW  # the manifest moved on ...
    assert list(ids(orch.index, ItemState.INGESTED)) == [REPORT.item_id]  # ... the index did not
    orch.report(REPORT)  # Celery delivers the unacknowledged report again
    assert list(ids(orch.index, ItemState.REVIEW)) == [REPORT.item_id] and list(ids(orch.index, ItemState.INGESTED)) == []
    assert orch.next_review("ann").item_id == REPORT.item_id  # NextReview goes by the index


def test_a_dead_holders_lock_frees_within_its_ttl(tmp_path, broker):
    orch = orchestrator(tmp_path, broker)
    proc = child(tmp_path, broker, "lock")
    assert proc.stdout.readline().strip() == "locked"
    assert proc.wait(timeout=60) == -9
    start = time.monotonic()
    with orch.index.lock(REPORT.item_id):
        waited = time.monotonic() - start
    assert waited <= orch.index.lock_ttl_s + 1.0, waited
    # a live holder keeps it past the TTL: the lock is renewed while held
    with orch.index.lock(REPORT.item_id):
        time.sleep(orch.index.lock_ttl_s * 1.5)
        other = RedisIndex(broker, lock_timeout_s=0.5)
        with pytest.raises(Exception, match="stayed locked"):
            with other.lock(REPORT.item_id):
                pass
