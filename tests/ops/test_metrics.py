"""Prometheus metrics (issue 15): the gRPC interceptor counts and times every RPC by service, method
and code (refusals included), the decoder counts embedding-cache hits and misses, Celery runs with
task events on; and over the five services started with `dataengine serve`, each process's /metrics,
read with prometheus-client's own text parser, moves as a few items go through."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.common.auth import TokenFile
from services.common.pb import common_pb2, concepts_pb2, concepts_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from services.common.queues import SERVICES, create_celery
from services.common.settings import Settings
from services.concepts.core import ConceptsCore
from services.concepts.servicer import add_to_server
from tests.servers import free_port, grpc_loopback, stop_process


def handled(method: str, code: str, service: str = "dataengine.v1.Concepts") -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": service, "grpc_method": method, "grpc_code": code}) or 0.0


def png(h=24, w=32, seed=1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_the_interceptor_counts_every_rpc_by_code_and_times_it(local_store, tmp_path):
    core = ConceptsCore("labels", local_store)
    before = {code: handled("Propose", code) for code in ("OK", "INVALID_ARGUMENT", "UNAUTHENTICATED")}
    seconds = REGISTRY.get_sample_value("grpc_server_handling_seconds_count", {
        "grpc_type": "unary", "grpc_service": "dataengine.v1.Concepts", "grpc_method": "Propose"}) or 0.0
    with grpc_loopback(lambda s: add_to_server(s, core), 4 << 20) as (channel, _):
        stub = concepts_pb2_grpc.ConceptsStub(channel)
        image = common_pb2.ImageRef(data=png())
        for _ in range(3):
            stub.Propose(concepts_pb2.ProposeRequest(image=image, known_labels=["dog"]), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Propose(concepts_pb2.ProposeRequest(image=image, known_labels=[""]), timeout=30)
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text("[]")
    with grpc_loopback(lambda s: add_to_server(s, core), 4 << 20, tokens=TokenFile(tokens_file)) as (channel, _):
        with pytest.raises(grpc.RpcError):  # no token: refused by the auth interceptor, still counted
            concepts_pb2_grpc.ConceptsStub(channel).Propose(concepts_pb2.ProposeRequest(image=image), timeout=30)
    after = {code: handled("Propose", code) for code in before}
    assert {c: after[c] - before[c] for c in after} == {"OK": 3, "INVALID_ARGUMENT": 1, "UNAUTHENTICATED": 1}
    assert (REGISTRY.get_sample_value("grpc_server_handling_seconds_count", {
        "grpc_type": "unary", "grpc_service": "dataengine.v1.Concepts", "grpc_method": "Propose"}) - seconds) == 5


def test_the_decoder_counts_embedding_cache_hits_and_misses(tiny_sam, local_store):
    from services.decoder.core import DecoderCore
    from tests.decoder.builders import blob_image, embed, put

    def count(result: str) -> float:
        return REGISTRY.get_sample_value("dataengine_embedding_cache_requests_total", {"result": result}) or 0.0

    key = put(local_store, embed(tiny_sam, blob_image(40, 56), "img"))
    core = DecoderCore(tiny_sam, local_store, cache_size=4)
    hits, misses = count("hit"), count("miss")
    for _ in range(3):
        core.load_embedding(key)
    assert (count("hit") - hits, count("miss") - misses) == (2, 1)


def test_celery_sends_task_events_for_flower():
    conf = create_celery(Settings()).conf
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True


def scrape(port: int) -> dict[str, list]:
    """name -> samples of the process's /metrics, parsed by prometheus-client's own parser."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append(sample)
    return families


def value(families: dict, name: str, **labels) -> float:
    return sum(s.value for s in families.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_every_service_exposes_metrics_that_move_with_the_work(broker, tiny_checkpoint, tmp_path):
    grid = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    env = {**os.environ, "DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
           "DATAENGINE_BROKER_URL": broker, "DATAENGINE_MODEL_TYPE": "tiny",
           "DATAENGINE_CHECKPOINT": str(tiny_checkpoint), "DATAENGINE_AMG_PARAMS": json.dumps(grid),
           "DATAENGINE_HOST": "127.0.0.1", "DATAENGINE_SHUTDOWN_GRACE_S": "2", "DATAENGINE_EMBED_BATCH_SIZE": "1"}
    grpc_ports = {s: free_port() for s in SERVICES}
    metrics_ports = {s: free_port() for s in SERVICES}
    procs = {}
    try:
        for service in SERVICES:
            service_env = {**env, f"DATAENGINE_{service.upper()}_PORT": str(grpc_ports[service]),
                           "DATAENGINE_METRICS_PORT": str(metrics_ports[service])}
            log = open(tmp_path / f"{service}.log", "wb")
            procs[service] = subprocess.Popen([sys.executable, "-m", "services.app.cli", "serve", service],
                                              env=service_env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:  # every /metrics answers once its process has built its core
            try:
                first = {s: scrape(p) for s, p in metrics_ports.items()}
                break
            except OSError:
                assert time.monotonic() < deadline, "a /metrics endpoint never answered"
                assert all(p.poll() is None for p in procs.values()), "a service exited"
                time.sleep(0.5)
        assert value(first["embedder"], "dataengine_model_load_seconds", service="embedder") > 0
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_ports['orchestrator']}")
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)

        def submit_and_settle(n: int, seed: int) -> None:
            images = [common_pb2.ImageRef(data=png(24 + i, 32, seed + i), filename=f"{seed}-{i}.png") for i in range(n)]
            ids = stub.Submit(orchestrator_pb2.SubmitRequest(images=images, known_labels=["dog"]), timeout=60).item_ids
            deadline = time.monotonic() + 180
            while True:
                states = [stub.GetItem(orchestrator_pb2.GetItemRequest(item_id=i), timeout=30).state for i in ids]
                if all(s >= common_pb2.ITEM_STATE_ACCEPTED for s in states):
                    return
                assert time.monotonic() < deadline, f"items not settled: {states}"
                time.sleep(0.3)

        submit_and_settle(3, seed=10)
        before = {s: scrape(p) for s, p in metrics_ports.items()}
        submit_and_settle(2, seed=20)
        after = {s: scrape(p) for s, p in metrics_ports.items()}

        def moved(process, name, **labels) -> float:
            return value(after[process], name, **labels) - value(before[process], name, **labels)

        for service, step in (("embedder", "embed"), ("concepts", "propose"), ("decoder", "decode"),
                              ("verifier", "verify")):
            assert moved(service, "dataengine_tasks_total", service=service, step=step, outcome="ok") == 2, service
            assert moved(service, "dataengine_task_seconds_count", service=service, step=step) == 2, service
        # the orchestrator applied 4 reports per item, answered Submit and the GetItem polls
        assert moved("orchestrator", "dataengine_tasks_total", task="orchestrator.report", outcome="ok") == 8
        assert moved("orchestrator", "grpc_server_handled_total", grpc_method="Submit", grpc_code="OK") == 1
        assert moved("orchestrator", "grpc_server_handled_total", grpc_method="GetItem", grpc_code="OK") >= 2
        items = value(after["orchestrator"], "dataengine_items")
        assert items == 5, after["orchestrator"].get("dataengine_items")
        assert {s.labels["queue"] for s in after["orchestrator"]["dataengine_queue_messages"]} == set(SERVICES)
        assert "dataengine_dead_letters" in after["orchestrator"]
        settled = sum(moved("orchestrator", "dataengine_items_settled_total", state=state)
                      for state in ("accepted", "review", "rejected", "failed"))
        assert settled == 2
        waiting = value(after["orchestrator"], "dataengine_review_backlog")
        oldest = value(after["orchestrator"], "dataengine_review_backlog_oldest_seconds")
        assert (oldest > 0) == (waiting > 0), (waiting, oldest)  # the first three have waited since they settled
    finally:
        for proc in procs.values():
            stop_process(proc, timeout=30)


MULTIPROCESS = """
import multiprocessing, sys
from prometheus_client import generate_latest
from services.common import metrics

def work(n):
    for _ in range(n):
        metrics.REVIEWS.labels("review", "accept").inc()
    metrics.MODEL_LOAD_SECONDS.labels("decoder").set(n)

if __name__ == "__main__":
    children = [multiprocessing.get_context("fork").Process(target=work, args=(n,)) for n in (2, 3)]
    for c in children:
        c.start()
    for c in children:
        c.join()
    sys.stdout.write(generate_latest(metrics.scrape_registry()).decode())
"""


def test_the_multiprocess_mode_sums_what_forked_workers_counted(tmp_path):
    script = tmp_path / "forks.py"
    script.write_text(MULTIPROCESS)
    (tmp_path / "prom").mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out.stdout) for s in f.samples}
    assert samples[("dataengine_reviews_total", (("decision", "accept"), ("kind", "review")))] == 5
    assert samples[("dataengine_model_load_seconds", (("service", "decoder"),))] == 3  # the slowest load
