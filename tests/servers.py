"""Real servers for tests: redis-server and moto's S3 server, each on a free port."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, what: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM (a graceful stop), then SIGKILL after ``timeout`` seconds; nothing if it has ended."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def grpc_loopback(add_services, max_message_bytes: int, client_max_bytes: int | None = None, tokens=None,
                  tls=None, client_tls=None):
    """A gRPC server on a free loopback port with ``add_services(server)`` registered, and a
    channel to it. Yields (channel, "127.0.0.1:PORT"). client_max_bytes: the channel's own limit
    (default: the server's), larger to see how the server answers an oversized request.
    tokens: a ``TokenFile`` the server checks callers against (None: no authentication).
    tls / client_tls: the server's and the channel's ``TlsFiles`` (None: plaintext)."""
    from services.common.grpc_server import build_server, client_channel
    from services.common.tls import PLAINTEXT

    server, port = build_server(add_services, "127.0.0.1:0", max_message_bytes, workers=2, tokens=tokens,
                                tls=tls or PLAINTEXT)
    server.start()
    channel = client_channel(f"127.0.0.1:{port}", client_max_bytes or max_message_bytes, tls=client_tls or PLAINTEXT)
    try:
        yield channel, f"127.0.0.1:{port}"
    finally:
        channel.close()
        server.stop(0).wait()


@contextmanager
def redis_server(workdir: Path, tls=None, password: str = "") -> Iterator[str]:
    """Yields ``redis://127.0.0.1:PORT/0``; no persistence, 256 databases (one per test that
    needs its own queues), stopped on exit. ``tls`` (a ``TlsFiles``): TLS only, no plaintext port,
    client certificates not asked for; yields ``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=CA``.
    ``password``: ``requirepass``, and the URL carries it."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server not found: `make setup` installs it (apt-get install redis-server)")
    port = free_port()
    args = [exe, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir),
            "--databases", "256"]
    if tls is not None:
        args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert_file),
                 "--tls-key-file", str(tls.key_file), "--tls-ca-cert-file", str(tls.ca_file),
                 "--tls-auth-clients", "no"]
    else:
        args += ["--port", str(port)]
    if password:
        args += ["--requirepass", password]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ping() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            s = raw
            if tls is not None:
                s = ssl.create_default_context(cafile=str(tls.ca_file)).wrap_socket(raw, server_hostname="localhost")
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")

    auth = f":{password}@" if password else ""
    url = (f"rediss://{auth}localhost:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls.ca_file}"
           if tls is not None else f"redis://{auth}127.0.0.1:{port}/0")
    try:
        _wait(ping, "redis-server", proc)
        yield url
    finally:
        stop_process(proc)


@contextmanager
def s3_server(tls=None) -> Iterator[str]:
    """Yields ``127.0.0.1:PORT`` of moto's S3-compatible server (a separate process); over HTTPS
    only with ``tls`` (a ``TlsFiles``: its certificate and key; clients trust its ``ca_file``)."""
    port = free_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    context = None
    if tls is not None:
        args += ["--ssl-cert", str(tls.cert_file), "--ssl-key", str(tls.key_file)]
        context = ssl.create_default_context(cafile=str(tls.ca_file))
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheme = "https" if tls is not None else "http"

    def up() -> bool:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/moto-api/", timeout=1, context=context) as r:
            return r.status == 200

    try:
        _wait(up, "moto S3 server", proc)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def start_celery_worker(service: str, env: dict[str, str], log, loglevel: str = "INFO") -> subprocess.Popen:
    """A Celery worker process for ``service`` (solo pool, queue ``service``), as deployments run
    it; ``log`` is an open binary file for its output. The caller stops it."""
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", f"services.workers.{service}", "worker", "-Q", service,
         "-P", "solo", "-c", "1", "-n", f"{service}-{free_port()}@%h", "--without-gossip", "--without-mingle",
         "-l", loglevel], env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_worker(worker: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM (Celery's warm shutdown), SIGKILL if it does not stop in ``timeout``; the exit code."""
    worker.terminate()
    try:
        return worker.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        return worker.wait()


@contextmanager
def celery_worker(service: str, env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A Celery worker for ``service`` in its own process. On exit it gets SIGTERM and must shut
    down warm with exit code 0."""
    with open(log_path, "wb") as log:
        worker = start_celery_worker(service, env, log)
        try:
            yield worker
        finally:
            code = stop_worker(worker)
    assert code == 0, f"worker exited with {code}: " + Path(log_path).read_text()[-3000:]


class UvicornThread:
    """An ASGI app served by uvicorn on a free loopback port in a thread (the studio's HTTP server
    in tests and benchmarks); stopped as uvicorn stops on SIGTERM. ``with`` gives the base URL."""

    def __init__(self, app, **options) -> None:
        """``options``: more uvicorn.Config arguments (the TLS ones: TlsFiles.uvicorn_options())."""
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    access_log=False, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
