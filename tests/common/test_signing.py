"""Celery's message signing as a setting (DATAENGINE_QUEUE_SIGNING_*): a worker process takes
only task messages signed by a trusted certificate; plain JSON published by hand and messages
signed by a stranger are discarded unrun, and the worker goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.common.errors import FailedPrecondition
from services.common.queues import TaskOutcome, create_celery
from services.common.settings import Settings
from services.concepts.tasks import TASK_NAME
from tests.certs import signing_pair
from tests.common.image_cases import png
from tests.servers import celery_worker

# A client in its own process: the signing serializer is process-wide (kombu's registry).
SEND = """
import json, sys
from celery.exceptions import TimeoutError
from services.common.queues import create_celery
from services.common.settings import get_settings
app = create_celery(get_settings())
try:
    print(json.dumps(app.send_task(sys.argv[1], args=json.loads(sys.argv[2])).get(timeout=float(sys.argv[3]))))
except TimeoutError:
    print("no result")
"""


def _signing_env(key, cert, store: str) -> dict[str, str]:
    return {"DATAENGINE_QUEUE_SIGNING_KEY": str(key), "DATAENGINE_QUEUE_SIGNING_CERT": str(cert),
            "DATAENGINE_QUEUE_SIGNING_STORE": store}


def _send(env: dict[str, str], args: list, timeout_s: float) -> TaskOutcome | None:
    out = subprocess.run([sys.executable, "-c", SEND, TASK_NAME, json.dumps(args), str(timeout_s)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    return None if last == "no result" else TaskOutcome.from_json(json.loads(last))


@pytest.mark.slow
def test_a_worker_runs_only_messages_signed_by_a_trusted_certificate(broker, local_store, tmp_path):
    engine_key, _ = signing_pair(tmp_path / "trusted", "engine")
    stranger_key, _ = signing_pair(tmp_path / "stranger", "stranger")
    store = str(tmp_path / "trusted" / "*.crt")
    base = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(local_store.root.parent),
            "DATAENGINE_BUCKET": local_store.root.name, "DATAENGINE_BROKER_URL": broker,
            "DATAENGINE_CONCEPTS_BACKEND": "ontology"}
    engine = {**base, **_signing_env(engine_key, tmp_path / "trusted" / "engine.crt", store)}
    stranger = {**base, **_signing_env(stranger_key, tmp_path / "stranger" / "stranger.crt",
                                       str(tmp_path / "stranger" / "*.crt"))}
    local_store.put("in/a.png", png(16, 16))
    log = tmp_path / "worker.log"
    with celery_worker("concepts", engine, log) as worker:
        signed = _send(engine, ["in/a.png", ["dog"]], 120)
        assert signed is not None and signed.ok, signed

        # plain JSON, as anyone who reaches Redis can publish, and a message signed by a certificate
        # not trusted: never run (the worker takes messages in order: both before the next one)
        plain = create_celery(Settings(broker_url=broker))
        plain.send_task(TASK_NAME, args=["in/a.png", ["cat"]], ignore_result=True)
        plain.close()
        assert _send(stranger, ["in/a.png", ["cat"]], 5) is None

        again = _send(engine, ["in/a.png", ["bird"]], 120)
        assert again is not None and again.ok, again
        assert worker.poll() is None
    text = log.read_text()
    assert "untrusted content of type json" in text, text[-3000:]
    assert "Unknown certificate" in text and "stranger" in text, text[-3000:]
    assert text.count("succeeded") == 2, text[-3000:]


def test_signing_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs all three of DATAENGINE_QUEUE_SIGNING_KEY"):
        Settings(queue_signing_key=tmp_path / "k.pem")
    key, cert = signing_pair(tmp_path, "engine")
    with pytest.raises(FailedPrecondition, match="DATAENGINE_QUEUE_SIGNING_STORE .* names no certificate"):
        create_celery(Settings(queue_signing_key=key, queue_signing_cert=cert,
                               queue_signing_store=str(tmp_path / "none" / "*.crt")))
