"""The studio as its container runs it: `dataengine serve studio` (the image's ENTRYPOINT and the
studio target's CMD) with the Compose service's environment, probed the way Compose and Kubernetes
probe it, then stopped with SIGTERM. Only the store is swapped for a local one; the orchestrator
and decoder addresses point where nothing listens (the studio's gRPC channels connect lazily, and
its health is its own HTTP server, not theirs)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.deploy.manifests import (DOCKERFILE, HEALTHZ, STUDIO, compose, dockerfile_stages, interpolate,
                                    k8s_by_kind, only_container)
from tests.servers import free_port, stop_process

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the studio target, as `docker run dataengine-studio` runs them."""
    stages = dockerfile_stages()
    (entrypoint,) = [json.loads(a) for i, a in stages["runtime"] if i == "ENTRYPOINT"]
    (cmd,) = [json.loads(a) for i, a in stages[STUDIO] if i == "CMD"]
    assert entrypoint[0] == "dataengine", DOCKERFILE
    return [sys.executable, "-m", "services.app.cli", *entrypoint[1:], *cmd]


def compose_healthcheck(port: int) -> list[str]:
    """The Compose healthcheck's command, aimed at ``port`` instead of the container's 8080."""
    test = compose()["services"][STUDIO]["healthcheck"]["test"]
    code, n = re.subn(r"(http://127\.0\.0\.1:)\d+/", rf"\g<1>{port}/", test[3])
    assert n == 1, test
    return [sys.executable if word == "python" else word for word in test[1:3]] + [code]


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    return subprocess.run(compose_healthcheck(port), capture_output=True, text=True, timeout=30)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers.get("content-type", ""), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


@pytest.fixture
def studio_process(tmp_path):
    """The studio on a free port with the Compose environment; yields (port, process)."""
    port = free_port()
    env = {k: interpolate(v) for k, v in compose()["services"][STUDIO]["environment"].items()}
    env.update({"DATAENGINE_STORE": "local", "DATAENGINE_STORE_ROOT": str(tmp_path / "store"),
                "DATAENGINE_STUDIO_PORT": str(port), "DATAENGINE_HOST": "127.0.0.1",
                "DATAENGINE_ORCHESTRATOR_ADDRESS": f"127.0.0.1:{free_port()}",
                "DATAENGINE_DECODER_ADDRESS": f"127.0.0.1:{free_port()}",
                "DATAENGINE_SHUTDOWN_GRACE_S": "2"})
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAENGINE_")}, **env}
    log_path = tmp_path / "studio.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(image_command(), env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while run_healthcheck(port).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the studio never got healthy:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield port, proc
    finally:
        stop_process(proc, timeout=30)
        log.close()


def test_studio_image_command_serves_page_and_health_then_stops_on_sigterm(studio_process, tmp_path):
    port, proc = studio_process
    base = f"http://127.0.0.1:{port}"
    assert get(base + HEALTHZ)[::2] == (200, b'{"ok":true}')
    # Kubernetes' httpGet probes: the path they ask for answers 2xx.
    container = only_container(k8s_by_kind("Deployment")[STUDIO])
    for probe in PROBES:
        status, _, _ = get(base + container[probe]["httpGet"]["path"])
        assert 200 <= status < 300, probe
    # The page and the files it loads (package data: services/studio/static).
    status, ctype, page = get(base + "/")
    assert status == 200 and ctype.startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.decode())
    assert assets, "the page loads no static files?"
    for asset in assets:
        assert get(base + asset)[0] == 200, asset

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "studio.log").read_text()[-3000:]
    failed = run_healthcheck(port)
    assert failed.returncode == 1 and "Connection refused" in failed.stderr


def test_healthcheck_fails_on_an_error_status():
    """urlopen raises on a non-2xx answer: a server answering 503 is unhealthy, not healthy."""
    import http.server
    import threading

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(503)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_healthcheck(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and "503" in result.stderr
