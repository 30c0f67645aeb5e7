"""A loopback OpenAI-compatible endpoint for tests: ``POST /v1/chat/completions`` answers from a
script of ``Reply`` objects, one per request, in order, and records every request it received.

It speaks the wire format the real ``openai`` client expects (a ``chat.completion`` object, the
OpenAI error body ``{"error": {"message": ...}}``), so tests exercise the client's own timeouts,
retries and parsing. Retriable replies (429, 5xx) carry ``retry-after-ms: 1``, which the client
honours, so a retry costs a millisecond rather than its default half-second backoff.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the stub answers to one request.

    content: the assistant's text (None: a message without content). status: HTTP status; not
    200 sends an OpenAI error body with ``error``. delay_s: seconds to wait before answering.
    logprobs: (token, logprob) alternatives of the first answer token, sent as ``top_logprobs``
    (None: no ``logprobs`` in the answer). sampled_only: send the most likely of them as the
    sampled token and an empty ``top_logprobs`` (a server that ignores ``top_logprobs``).
    """

    content: str | None = ""
    status: int = 200
    delay_s: float = 0.0
    error: str = ""
    logprobs: list[tuple[str, float]] | None = None
    choices: int = 1  # 0: a completion without any choice
    sampled_only: bool = False


@dataclass
class Seen:
    """One request as the stub received it: the JSON body and the headers (lower-case names)."""

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content(self) -> list[dict[str, Any]]:
        """The parts of the first message's content (image_url and text parts)."""
        return self.body["messages"][0]["content"]

    @property
    def prompt(self) -> str:
        return next(p["text"] for p in self.content if p["type"] == "text")

    @property
    def image_url(self) -> str:
        return next(p["image_url"]["url"] for p in self.content if p["type"] == "image_url")


def _completion(reply: Reply, model: str, n: int) -> dict[str, Any]:
    logprobs = None
    if reply.logprobs is not None:
        token, logprob = max(reply.logprobs, key=lambda t: t[1])
        logprobs = {"content": [{"token": token, "logprob": logprob, "bytes": None,
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                  for t, lp in reply.logprobs][:0 if reply.sampled_only else None]}]}
    choices = [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                "message": {"role": "assistant", "content": reply.content}}][:reply.choices]
    return {"id": f"chatcmpl-stub-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class OpenAIStub:
    """The server; use as a context manager. ``url`` is the API root (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        self.default: Reply | None = None  # the answer once the script is used up (None: an error)
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # wakes slow replies at shutdown
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with stub._lock:
                    stub.seen.append(Seen(json.loads(raw), {k.lower(): v for k, v in self.headers.items()}))
                    n = len(stub.seen)
                    reply = stub.script.popleft() if stub.script else stub.default
                if reply is None:  # a test bug: say so, and tell the client not to retry
                    return self._send(400, {"error": {"message": f"stub: no scripted reply for request {n}"}},
                                      {"x-should-retry": "false"})
                if reply.delay_s and stub._closing.wait(reply.delay_s):
                    return
                if reply.status != 200:
                    retry = {"retry-after-ms": "1"} if reply.status == 429 or reply.status >= 500 else {}
                    return self._send(reply.status, {"error": {"message": reply.error, "type": "stub_error"}}, retry)
                self._send(200, _completion(reply, stub.seen[n - 1].body.get("model", ""), n))

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        # a short poll so that shutdown (which waits for the next poll) takes milliseconds
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="openai-stub",
                                        daemon=True)

    def push(self, *replies: Reply) -> "OpenAIStub":
        """Queue replies for the next requests, in order."""
        with self._lock:
            self.script.extend(replies)
        return self

    def __enter__(self) -> "OpenAIStub":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
