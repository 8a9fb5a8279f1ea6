"""The OpenAI-compatible adapter against a real HTTP server on loopback that speaks
the chat-completions protocol with scripted replies. The server is protocol-agnostic
(it records what it gets and plays scripted replies); the Anthropic tests use it too."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agentbus.core.llm import ChatRequest, LLMError, Message, OpenAIProvider, PriceTable, ToolSpec


@dataclass
class Scripted:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (to provoke client timeouts)


@dataclass
class FakeOpenAI:
    replies: list[Scripted] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # time.monotonic() per request


@pytest.fixture
def server() -> Iterator[tuple[FakeOpenAI, str]]:
    state = FakeOpenAI()
    stopping = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.arrived.append(time.monotonic())
            length = int(self.headers["Content-Length"])
            state.requests.append({"path": self.path, **json.loads(self.rfile.read(length))})
            state.auth.append(self.headers.get("Authorization", ""))
            state.headers.append({k.lower(): v for k, v in self.headers.items()})
            reply = state.replies.pop(0)
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
    # A short poll interval lets shutdown() return at once instead of after 0.5 s.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    stopping.set()
    httpd.shutdown()
    httpd.server_close()


def completion(message: dict[str, Any], **usage: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, **usage},
    }


def provider(url: str, **kw: Any) -> OpenAIProvider:
    return OpenAIProvider(
        url, api_key="sk-test", model="gpt-4o-mini", prices=PriceTable.load(), max_wait_s=0.2, **kw
    )


REQUEST = ChatRequest(
    messages=[Message(role="user", content="run it")],
    tools=[ToolSpec(name="run_python", description="run", parameters={"type": "object"})],
)


async def test_tool_calls_usage_and_cost(server: tuple[FakeOpenAI, str]) -> None:
    state, url = server
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "run_python", "arguments": '{"code": "print(1)"}'},
    }
    state.replies.append(
        Scripted(
            body=completion(
                {"role": "assistant", "content": None, "tool_calls": [call]},
                prompt_tokens_details={"cached_tokens": 40},
            )
        )
    )
    llm = provider(url)
    reply = await llm.chat(REQUEST)
    await llm.aclose()
    assert reply.message.tool_calls[0].name == "run_python"
    assert reply.message.tool_calls[0].arguments == {"code": "print(1)"}
    assert (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
        reply.usage.cached_tokens,
    ) == (100, 20, 40)
    assert reply.usage.cost_usd == pytest.approx((60 * 0.15 + 40 * 0.075 + 20 * 0.6) / 1e6)
    sent = state.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["tools"][0] == {
        "type": "function",
        "function": {"name": "run_python", "description": "run", "parameters": {"type": "object"}},
    }
    assert state.auth[0] == "Bearer sk-test"


async def test_tool_results_go_back_in_openai_shape(server: tuple[FakeOpenAI, str]) -> None:
    state, url = server
    state.replies.append(Scripted(body=completion({"role": "assistant", "content": "done"})))
    history = ChatRequest(
        messages=[
            Message(
                role="assistant",
                tool_calls=[{"id": "c1", "name": "run_python", "arguments": {"code": "1"}}],
            ),  # type: ignore[list-item]
            Message(role="tool", tool_call_id="c1", content="1"),
        ]
    )
    llm = provider(url)
    assert (await llm.chat(history)).message.content == "done"
    await llm.aclose()
    sent = state.requests[0]["messages"]
    assert sent[0]["tool_calls"][0]["function"] == {
        "name": "run_python",
        "arguments": '{"code": "1"}',
    }
    assert sent[1] == {"role": "tool", "content": "1", "tool_call_id": "c1"}


async def test_429_with_retry_after_then_success(server: tuple[FakeOpenAI, str]) -> None:
    state, url = server
    state.replies += [
        Scripted(429, {"error": "slow down"}, {"Retry-After": "0.05"}),
        Scripted(503, {"error": "busy"}),
        Scripted(body=completion({"role": "assistant", "content": "ok"})),
    ]
    llm = provider(url)
    assert (await llm.chat(REQUEST)).message.content == "ok"
    await llm.aclose()
    assert len(state.requests) == 3


@pytest.mark.parametrize(("status", "hint"), [(401, "API key was refused"), (404, "unknown model")])
async def test_auth_and_model_errors_are_not_retried(
    server: tuple[FakeOpenAI, str], status: int, hint: str
) -> None:
    state, url = server
    state.replies.append(Scripted(status, {"error": {"message": "nope"}}))
    llm = provider(url)
    with pytest.raises(LLMError, match=hint) as info:
        await llm.chat(REQUEST)
    await llm.aclose()
    assert not info.value.retryable
    assert len(state.requests) == 1


async def test_malformed_json_is_a_clear_error_after_retries(
    server: tuple[FakeOpenAI, str],
) -> None:
    state, url = server
    state.replies += [Scripted(body=b"{not json")] * 2
    llm = provider(url, max_attempts=2)
    with pytest.raises(LLMError, match="malformed JSON"):
        await llm.chat(REQUEST)
    await llm.aclose()
    assert len(state.requests) == 2


async def test_unreachable_endpoint_says_where() -> None:
    llm = provider("http://127.0.0.1:9/v1", max_attempts=1)
    with pytest.raises(LLMError, match=r"cannot reach the LLM at http://127\.0\.0\.1:9/v1"):
        await llm.chat(REQUEST)
    await llm.aclose()


async def test_500_then_success(server: tuple[FakeOpenAI, str]) -> None:
    state, url = server
    state.replies += [
        Scripted(500, {"error": "boom"}),
        Scripted(body=completion({"role": "assistant", "content": "ok"})),
    ]
    llm = provider(url)
    reply = await llm.chat(REQUEST)
    await llm.aclose()
    assert reply.message.content == "ok"
    assert len(state.requests) == 2


async def test_timeout_is_retried_then_a_clear_retryable_error(
    server: tuple[FakeOpenAI, str],
) -> None:
    state, url = server
    state.replies += [Scripted(body=completion({"role": "assistant"}), delay=2)] * 2
    llm = provider(url, timeout_s=0.05, max_attempts=2)
    with pytest.raises(LLMError, match=r"timed out after 0\.05 s") as info:
        await llm.chat(REQUEST)
    await llm.aclose()
    assert info.value.retryable
    assert len(state.requests) == 2
