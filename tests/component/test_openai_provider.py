"""The OpenAI-compatible adapter against a real HTTP server on loopback that speaks
the chat-completions protocol with scripted replies (``tests.fake_llm``, which the
Anthropic and rate limiter tests use too)."""

from __future__ import annotations

from typing import Any

import pytest

from agentbus.core.llm import ChatRequest, LLMError, Message, OpenAIProvider, PriceTable, ToolSpec
from tests.fake_llm import FakeOpenAI, Scripted, completion, server

__all__ = ["server"]  # the fixture


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
