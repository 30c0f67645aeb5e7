"""Celery task ``concepts.propose`` on a real Redis broker: an in-process worker over the ontology
and a loopback OpenAI-compatible endpoint, and a separate worker process; each bad message is a
failure outcome naming the problem, and the worker goes on."""

from __future__ import annotations

import json
import os

import pytest
from celery.contrib.testing.worker import start_worker

from services.common.concepts import Proposal
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.concepts.core import ConceptsCore
from services.concepts.tasks import TASK_NAME, register_tasks
from tests.common.image_cases import BAD_IMAGES, png
from tests.openai_stub import Reply
from tests.servers import celery_worker

GOOD_ANSWER = {"phrases": [{"text": "Yellow Taxis", "box": [0, 0, 500, 500], "score": 0.9}],
               "hard_negatives": [{"text": "yellow school bus", "reason": "model", "score": 0.8}]}


def _run(app, *args, timeout: float = 60, **kwargs) -> TaskOutcome:
    return TaskOutcome.from_json(app.send_task(TASK_NAME, args=list(args), kwargs=kwargs).get(timeout=timeout))


@pytest.fixture
def app(broker):
    return create_celery(Settings(broker_url=broker))


def test_outcomes_on_an_in_process_worker(app, local_store, openai_stub):
    settings = Settings(concepts_endpoint=openai_stub.url, concepts_model="vlm", mllm_max_retries=0,
                        mllm_timeout_s=0.3)
    core = ConceptsCore("ontology", local_store, 10**6, settings)
    register_tasks(app, lambda: core, max_attempts=2)
    local_store.put("in/a.png", png(20, 40))
    local_store.put("in/truncated.png", BAD_IMAGES["truncated_png"][0])
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["concepts"], shutdown_timeout=30):
        good = _run(app, "in/a.png", ["Yellow Taxis", "dog"], 0, 3)
        assert good.ok, good.reason
        proposal = Proposal.from_json(good.outputs)
        assert [p.text for p in proposal.phrases] == ["yellow taxi", "dog"]  # cleaned
        assert len(proposal.hard_negatives) == 3  # the cap
        assert {n.reason for n in proposal.hard_negatives} <= {"ontology_sibling", "attribute_swap"}
        assert Proposal.from_json(_run(app, "in/a.png").outputs) == Proposal()  # no labels: nothing to contrast

        # the endpoint: a good answer is a grounded proposal in pixels of the stored image
        openai_stub.push(Reply(json.dumps(GOOD_ANSWER)))
        model = Proposal.from_json(_run(app, "in/a.png", backend="openai").outputs)
        assert [(p.text, [i.box for i in p.instances]) for p in model.phrases] == [("yellow taxi", [(0.0, 0.0, 20.0, 10.0)])]
        assert [(n.text, n.source) for n in model.hard_negatives] == [("yellow school bus", "openai:vlm")]

        # each bad message -> failure outcome with the reason and the gRPC code name, no crash
        for args, kwargs, code, phrase in [
            (("in/missing.png", ["dog"]), {}, "NOT_FOUND", "in/missing.png"),
            (("in/truncated.png",), {"backend": "openai"}, "INVALID_ARGUMENT", "truncated"),
            (("in/a.png", "dog"), {}, "INVALID_ARGUMENT", "known_labels must be a list"),
            (("in/a.png", ["dog", ""]), {}, "INVALID_ARGUMENT", "empty"),
            (("in/a.png", ["dog"], -1), {}, "INVALID_ARGUMENT", "max_positives must be an integer >= 0"),
            (("in/a.png",), {"backend": "gpt"}, "INVALID_ARGUMENT", "unknown concepts backend 'gpt'"),
            ((42,), {}, "INVALID_ARGUMENT", "image_key must be an object key"),
            (("in/a.png",), {"labels": ["dog"]}, "INVALID_ARGUMENT", "unexpected keyword argument 'labels'"),
        ]:
            bad = _run(app, *args, **kwargs)
            assert (bad.ok, bad.code) == (False, code) and phrase in bad.reason, (args, kwargs, bad)
        assert _run(app, "in/a.png", ["dog"]).ok  # the same worker still proposes


@pytest.mark.slow
def test_a_worker_process_serves_propose_from_the_environment(app, broker, local_store, openai_stub, tmp_path):
    """``celery -A services.workers.concepts``: the task is registered from the settings
    (ontology by default), survives a bad message, and retries a model that times out."""
    root = local_store.root.parent
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(root),
           "DATAENGINE_BUCKET": local_store.root.name, "DATAENGINE_BROKER_URL": broker,
           "DATAENGINE_CONCEPTS_ENDPOINT": openai_stub.url, "DATAENGINE_CONCEPTS_MODEL": "vlm",
           "DATAENGINE_MLLM_TIMEOUT_S": "0.3", "DATAENGINE_MLLM_MAX_RETRIES": "0", "DATAENGINE_MAX_ATTEMPTS": "2"}
    env.pop("DATAENGINE_CONCEPTS_BACKEND", None)
    local_store.put("in/a.png", png(20, 40))
    with celery_worker("concepts", env, tmp_path / "worker.log") as worker:
        bad = _run(app, "in/nope.png", ["dog"], timeout=120)
        assert (bad.ok, bad.code) == (False, "NOT_FOUND")
        good = _run(app, "in/a.png", ["red car"], 0, 5)
        assert good.ok, good.reason
        negatives = [n.text for n in Proposal.from_json(good.outputs).hard_negatives]
        assert len(negatives) == 5 and "car" not in negatives and "red car" not in negatives

        # a model that times out: retried once after a second's backoff, then a failure saying so
        openai_stub.push(Reply(json.dumps(GOOD_ANSWER), delay_s=3), Reply(json.dumps(GOOD_ANSWER), delay_s=3))
        slow = _run(app, "in/a.png", backend="openai")
        assert (slow.ok, slow.code) == (False, "UNAVAILABLE"), slow
        assert "no answer within 0.3 s" in slow.reason and "gave up after 2 attempts" in slow.reason
        assert len(openai_stub.seen) == 2
        assert _run(app, "in/a.png", ["dog"]).ok
        assert worker.poll() is None  # the same worker process served them all
