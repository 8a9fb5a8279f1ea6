"""The Anthropic adapter against a real HTTP server on loopback that answers in the
Messages API's shape with scripted replies (the same server as the OpenAI tests)."""

from __future__ import annotations

from typing import Any

import pytest

from agentbus.core.llm import (
    ANTHROPIC_API_URL,
    ANTHROPIC_VERSION,
    NOT_CONFIGURED_HINT,
    AnthropicProvider,
    ChatRequest,
    LLMError,
    Message,
    PriceTable,
    ToolCall,
    ToolSpec,
    build_provider,
)
from agentbus.core.settings import LLMSettings
from tests.fake_llm import FakeOpenAI as FakeServer
from tests.fake_llm import Scripted, server

__all__ = ["server"]  # the fixture, shared with the OpenAI tests

MODEL = "claude-sonnet-4-20250514"


def message(content: list[dict[str, Any]], stop: str = "end_turn", **usage: Any) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": content,
        "stop_reason": stop,
        "usage": {"input_tokens": 100, "output_tokens": 20, **usage},
    }


def provider(url: str, **kw: Any) -> AnthropicProvider:
    return AnthropicProvider(
        url, api_key="sk-ant-test", model=MODEL, prices=PriceTable.load(), max_wait_s=0.2, **kw
    )


TOOLS = [ToolSpec(name="run_python", description="run", parameters={"type": "object"})]
REQUEST = ChatRequest(messages=[Message(role="user", content="run it")], tools=TOOLS)


async def test_tool_use_round_trip(server: tuple[FakeServer, str]) -> None:
    state, url = server
    state.replies.append(
        Scripted(
            body=message(
                [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "tu_3", "name": "run_python", "input": {"c": "3"}},
                ],
                stop="tool_use",
                input_tokens=60,
                cache_read_input_tokens=40,
                cache_creation_input_tokens=10,
            )
        )
    )
    history = ChatRequest(
        messages=[
            Message(role="system", content="You are careful."),
            Message(role="system", content="Use tools."),
            Message(role="user", content="run two things"),
            Message(
                role="assistant",
                content="Running both.",
                tool_calls=[
                    ToolCall(id="tu_1", name="run_python", arguments={"c": "1"}),
                    ToolCall(id="tu_2", name="run_python", arguments={"c": "2"}),
                ],
            ),
            Message(role="tool", tool_call_id="tu_1", content="1"),
            Message(role="tool", tool_call_id="tu_2", content="2"),
        ],
        tools=TOOLS,
        max_tokens=512,
        temperature=0.2,
    )
    llm = provider(url)
    reply = await llm.chat(history)
    await llm.aclose()

    assert reply.message.content == "Checking."
    assert reply.message.tool_calls == [
        ToolCall(id="tu_3", name="run_python", arguments={"c": "3"})
    ]
    assert reply.finish_reason == "tool_use"
    assert reply.model == MODEL
    # input_tokens excludes the cache: prompt = 60 uncached + 40 read + 10 written.
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (110, 20, 40)
    assert usage.cost_usd == pytest.approx((70 * 3.0 + 40 * 0.30 + 20 * 15.0) / 1e6)

    sent = state.requests[0]
    assert sent["path"] == "/v1/messages"
    assert state.headers[0]["x-api-key"] == "sk-ant-test"
    assert state.headers[0]["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert "authorization" not in state.headers[0]
    assert sent["model"] == MODEL
    assert sent["max_tokens"] == 512
    assert sent["temperature"] == 0.2
    assert sent["system"] == "You are careful.\n\nUse tools."
    assert sent["tools"] == [
        {"name": "run_python", "description": "run", "input_schema": {"type": "object"}}
    ]
    assert sent["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "run two things"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Running both."},
                {"type": "tool_use", "id": "tu_1", "name": "run_python", "input": {"c": "1"}},
                {"type": "tool_use", "id": "tu_2", "name": "run_python", "input": {"c": "2"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "tu_1", "content": "1"},
                {"type": "tool_result", "tool_use_id": "tu_2", "content": "2"},
            ],
        },
    ]


async def test_same_role_turns_merge_and_json_output_goes_to_system(
    server: tuple[FakeServer, str],
) -> None:
    state, url = server
    state.replies.append(Scripted(body=message([{"type": "text", "text": '{"ok": true}'}])))
    request = ChatRequest(
        messages=[
            Message(role="user", content="first"),
            Message(role="user", content="second"),
            Message(role="assistant", tool_calls=[ToolCall(id="t1", name="run_python")]),
            Message(role="user", content="a nudge written before the result"),
            Message(role="tool", tool_call_id="t1", content="out"),
        ],
        json_output=True,
    )
    llm = provider(url)
    assert (await llm.chat(request)).message.content == '{"ok": true}'
    await llm.aclose()
    sent = state.requests[0]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][0]["content"] == [
        {"type": "text", "text": "first"},
        {"type": "text", "text": "second"},
    ]
    # The API wants tool results first in the user turn that answers tool calls.
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "out"},
        {"type": "text", "text": "a nudge written before the result"},
    ]
    assert "JSON object" in sent["system"]
    assert "response_format" not in sent
    assert "tools" not in sent


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_with_or_without_v1(server: tuple[FakeServer, str], suffix: str) -> None:
    state, url = server
    state.replies.append(Scripted(body=message([{"type": "text", "text": "hi"}])))
    llm = provider(url.removesuffix("/v1") + suffix)
    await llm.chat(REQUEST)
    await llm.aclose()
    assert state.requests[0]["path"] == "/v1/messages"


async def test_429_honours_retry_after_then_succeeds(server: tuple[FakeServer, str]) -> None:
    state, url = server
    state.replies += [
        Scripted(
            429, {"type": "error", "error": {"type": "rate_limit_error"}}, {"Retry-After": "0.2"}
        ),
        Scripted(body=message([{"type": "text", "text": "ok"}])),
    ]
    llm = provider(url)  # waits are capped at 0.2 s, so the jittered fallback is below it
    assert (await llm.chat(REQUEST)).message.content == "ok"
    await llm.aclose()
    assert len(state.requests) == 2
    # A lower bound, not a speed check: we waited at least what the server asked for.
    assert state.arrived[1] - state.arrived[0] >= 0.19


@pytest.mark.parametrize("status", [500, 529])
async def test_server_error_then_success(server: tuple[FakeServer, str], status: int) -> None:
    state, url = server
    state.replies += [
        Scripted(status, {"type": "error", "error": {"type": "overloaded_error"}}),
        Scripted(body=message([{"type": "text", "text": "ok"}])),
    ]
    llm = provider(url)
    assert (await llm.chat(REQUEST)).message.content == "ok"
    await llm.aclose()
    assert len(state.requests) == 2


async def test_401_is_not_retried_and_says_what_to_fix(server: tuple[FakeServer, str]) -> None:
    state, url = server
    state.replies.append(
        Scripted(401, {"type": "error", "error": {"type": "authentication_error"}})
    )
    llm = provider(url)
    with pytest.raises(LLMError, match="AGENTBUS_LLM_API_KEY") as info:
        await llm.chat(REQUEST)
    await llm.aclose()
    assert (info.value.retryable, info.value.status) == (False, 401)
    assert len(state.requests) == 1


async def test_malformed_json_is_a_clear_error_after_retries(
    server: tuple[FakeServer, str],
) -> None:
    state, url = server
    # Not JSON at all, then JSON that is not a Messages API answer.
    state.replies += [Scripted(body=b"{not json"), Scripted(body={"content": "oops"})]
    llm = provider(url, max_attempts=2)
    with pytest.raises(LLMError, match="malformed JSON") as info:
        await llm.chat(REQUEST)
    await llm.aclose()
    assert info.value.retryable
    assert len(state.requests) == 2


async def test_timeout_is_retried_then_a_clear_retryable_error(
    server: tuple[FakeServer, str],
) -> None:
    state, url = server
    state.replies += [Scripted(body=message([]), delay=2)] * 2
    llm = provider(url, timeout_s=0.05, max_attempts=2)
    with pytest.raises(LLMError, match=r"timed out after 0\.05 s") as info:
        await llm.chat(REQUEST)
    await llm.aclose()
    assert info.value.retryable
    assert len(state.requests) == 2


async def test_build_provider_defaults_to_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BASE_URL", "API_KEY", "MODEL", "REPLAY_FILE", "RECORD_DIR"):
        monkeypatch.delenv(f"AGENTBUS_LLM_{name}", raising=False)
    settings = LLMSettings(provider="anthropic", model=MODEL, api_key="sk-ant-x")
    llm = build_provider(settings, "planner")
    assert isinstance(llm, AnthropicProvider)
    assert llm.base_url == ANTHROPIC_API_URL
    await llm.aclose()
    with pytest.raises(LLMError, match="AGENTBUS_LLM_API_KEY"):
        build_provider(LLMSettings(provider="anthropic", model=MODEL), "executor")
    assert "AGENTBUS_LLM_PROVIDER=anthropic" in NOT_CONFIGURED_HINT
