"""A real HTTP server on loopback that plays scripted replies to LLM calls and records
what it gets. It is protocol-agnostic: the OpenAI and Anthropic adapter tests, the
rate limiter's integration tests and the scripted model (tests/scripted_llm.py) share it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass
class Scripted:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (to provoke client timeouts)


@dataclass
class FakeOpenAI:
    replies: list[Scripted] = field(default_factory=list)
    default: Scripted | None = None  # played when ``replies`` is empty
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() per request
    lock: threading.Lock = field(default_factory=threading.Lock)


Answer = Callable[[str, dict[str, str], dict[str, Any]], Scripted]


@contextmanager
def loopback_server(answer: Answer) -> Iterator[str]:
    """Serve POSTs on a free loopback port: ``answer(path, headers, body)`` says what to
    reply. Yields the base URL (``http://127.0.0.1:PORT/v1``)."""
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            headers = {k.lower(): v for k, v in self.headers.items()}
            reply = answer(self.path, headers, body)
            if reply.delay and stopping.wait(reply.delay):
                return
            payload = (
                reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
            )
            try:
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                return  # the client gave up (timed out) before we answered

        def log_message(self, *args: object) -> None:
            return

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    # A short poll interval lets shutdown() return at once instead of after 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        stopping.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[tuple[FakeOpenAI, str]]:
    state = FakeOpenAI()

    def answer(path: str, headers: dict[str, str], body: dict[str, Any]) -> Scripted:
        # One lock: the i-th arrival, request and reply belong together even when
        # requests come in concurrently.
        with state.lock:
            state.arrived.append(time.monotonic())
            state.requests.append({"path": path, **body})
            state.auth.append(headers.get("authorization", ""))
            state.headers.append(headers)
            reply = state.replies.pop(0) if state.replies else state.default
        assert reply is not None, "no scripted reply left"
        return reply

    with loopback_server(answer) as url:
        yield state, url


def completion(message: dict[str, Any], **usage: Any) -> dict[str, Any]:
    """An OpenAI chat-completions answer with ``message`` and usage."""
    return {
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, **usage},
    }
