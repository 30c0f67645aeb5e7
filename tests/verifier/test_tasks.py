"""Celery task ``verifier.verify`` on a real Redis broker: pairs name their masks by object key
(an SA-1B JSON and annotation indices), an in-process worker over the heuristic and a separate
worker process; each bad message is a failure outcome naming the problem, the worker goes on."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from celery.contrib.testing.worker import start_worker

from services.common.masks import sa1b_document
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.common.verdicts import Verification
from services.verifier.core import VerifierCore
from services.verifier.tasks import TASK_NAME, register_tasks
from tests.common.image_cases import png
from tests.servers import celery_worker
from tests.verifier.test_verifier import SIZE, drawn, mask

MASKS = [mask(0.9, 1.0, seed=0), mask(0.7, 1.0, seed=1), mask(0.95, 1.0, seed=2)]  # each scores its IoU


def _run(app, *args, timeout: float = 60, **kwargs) -> TaskOutcome:
    return TaskOutcome.from_json(app.send_task(TASK_NAME, args=list(args), kwargs=kwargs).get(timeout=timeout))


def _stored(store) -> None:
    store.put("in/a.png", png(*SIZE))
    store.put("masks/a.json", json.dumps(sa1b_document("a", SIZE, MASKS)).encode())
    other = drawn(np.pad(np.ones((3, 3), bool), ((0, 9), (0, 9))))  # 12x12: not the image's size
    store.put("masks/other.json", json.dumps(sa1b_document("b", (12, 12), [other])).encode())
    store.put("masks/junk.json", b'{"annotations": 3}')


PAIRS = [{"phrase": "dog", "masks_key": "masks/a.json", "mask_indices": [0, 1]},
         {"phrase": "frisbee", "masks_key": "masks/a.json", "mask_indices": [2]},
         {"phrase": "wolf", "is_negative": True}]


def test_outcomes_on_an_in_process_worker(broker, local_store):
    app = create_celery(Settings(broker_url=broker))
    register_tasks(app, lambda: VerifierCore("heuristic", local_store))
    _stored(local_store)
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["verifier"]):
        good = _run(app, "in/a.png", PAIRS)
        assert good.ok, good.reason
        verification = Verification.from_json(good.outputs)
        by_phrase = {p.phrase: p for p in verification.pairs}
        assert by_phrase["dog"].score == pytest.approx((0.9 + 0.7) / 2)  # the mean of its masks
        assert [v.check for v in by_phrase["dog"].verdicts] == ["mask", "mask"]
        assert by_phrase["frisbee"].score == pytest.approx(0.95)
        assert by_phrase["wolf"].verdicts[0].check == "hard_negative"
        assert verification.score == pytest.approx(0.8)  # the weakest positive pair

        only_masks = Verification.from_json(_run(app, "in/a.png", PAIRS, ["mask"]).outputs)
        assert [p.phrase for p in only_masks.pairs] == ["dog", "frisbee"]
        label = [{"phrase": "dog"}]  # no masks: an image-level label, scored by the grid's quality
        graded = Verification.from_json(_run(app, "in/a.png", label, grid_masks_key="masks/a.json").outputs)
        assert graded.pairs[0].verdicts[0].check == "exhaustivity"
        assert graded.score == pytest.approx((0.9 + 0.7 + 0.95) / 3)

        # each bad message -> failure outcome with the reason and the gRPC code name, no crash
        for args, kwargs, code, phrase in [
            (("in/a.png", []), {}, "INVALID_ARGUMENT", "pairs must be a non-empty list"),
            (("in/a.png", [{"phrase": "dog", "masks_key": "masks/a.json", "mask_indices": [3]}]), {},
             "INVALID_ARGUMENT", "mask_indices [3] are beyond the 3 masks of 'masks/a.json'"),
            (("in/a.png", [{"phrase": "dog", "masks_key": "masks/none.json"}]), {}, "NOT_FOUND", "masks/none.json"),
            (("in/a.png", [{"phrase": "dog", "masks_key": "masks/junk.json"}]), {},
             "INVALID_ARGUMENT", "'masks/junk.json' are not an SA-1B document"),
            (("in/a.png", [{"phrase": "dog", "kind": "animal"}]), {}, "INVALID_ARGUMENT", "unknown fields ['kind']"),
            (("in/a.png", [{"phrase": "dog", "is_negative": "yes"}]), {}, "INVALID_ARGUMENT",
             "is_negative must be true or false"),
            (("in/a.png", [{"phrase": "wolf", "masks_key": "masks/a.json", "is_negative": True}]), {},
             "INVALID_ARGUMENT", "is a hard negative but has 3 masks"),
            (("in/a.png", [PAIRS[0], {"phrase": "cat", "masks_key": "masks/other.json"}]), {},
             "INVALID_ARGUMENT", "is 12x12 but pair 'dog' mask 0 is 12x16"),
            (("in/a.png", [{"phrase": "cat", "masks_key": "masks/other.json"}]), {},
             "INVALID_ARGUMENT", "pair 'cat' mask 0 is 12x12 but the image is 12x16"),  # read from its header
            (("in/a.png", PAIRS, ["colour"]), {}, "INVALID_ARGUMENT", "unknown checks ['colour']"),
            (("in/missing.png", PAIRS), {}, "NOT_FOUND", "in/missing.png"),
            (("in/a.png", "dog"), {}, "INVALID_ARGUMENT", "pairs must be a non-empty list"),
        ]:
            bad = _run(app, *args, **kwargs)
            assert (bad.ok, bad.code) == (False, code) and phrase in bad.reason, (args, bad)

        assert _run(app, "in/a.png", PAIRS).ok  # the same worker still verifies


@pytest.mark.slow
def test_a_worker_process_serves_verify_from_the_environment(broker, local_store, tmp_path):
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(local_store.root.parent),
           "DATAENGINE_BUCKET": local_store.root.name, "DATAENGINE_BROKER_URL": broker}
    env.pop("DATAENGINE_VERIFIER_BACKEND", None)
    _stored(local_store)
    app = create_celery(Settings(broker_url=broker))
    with celery_worker("verifier", env, tmp_path / "worker.log") as worker:
        bad = _run(app, "in/a.png", [{"phrase": ""}], timeout=120)
        assert (bad.ok, bad.code) == (False, "INVALID_ARGUMENT") and "empty phrase" in bad.reason
        good = _run(app, "in/a.png", PAIRS)
        assert good.ok and Verification.from_json(good.outputs).score == pytest.approx(0.8)
        assert worker.poll() is None
