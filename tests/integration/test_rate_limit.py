"""The LLM rate limiter shared through JetStream KV (real nats-server), seen from the
LLM's side: a loopback server that counts the calls it gets. Each "replica" is an
OpenAIProvider with its own limiter and its own NATS connection; each test has its own
limiter scope (a fresh API key), so tests never share a window."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from agentbus.core.llm import (
    ChatRequest,
    LLMError,
    Message,
    OpenAIProvider,
    PriceTable,
    RateLimitTimeout,
    SharedRateLimiter,
    build_provider,
    limiter_scope,
    open_rate_limiter,
)
from agentbus.core.settings import LLMSettings
from tests.fake_llm import FakeOpenAI, Scripted, completion, server

__all__ = ["server"]  # the fixture

pytestmark = pytest.mark.integration

Server = tuple[FakeOpenAI, str]


def answer(prompt_tokens: int = 100, completion_tokens: int = 20) -> Scripted:
    return Scripted(
        body=completion(
            {"role": "assistant", "content": "ok"},
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
    )


def ask(task: str, text: str = "hi", max_tokens: int = 64) -> ChatRequest:
    return ChatRequest(
        messages=[Message(role="user", content=text)], task_id=task, max_tokens=max_tokens
    )


class Replicas:
    """Providers that share one limiter scope, each with its own NATS connection."""

    def __init__(self, stack: contextlib.AsyncExitStack, nats_url: str, url: str) -> None:
        self.stack = stack
        self.nats_url = nats_url
        self.url = url
        self.scope = limiter_scope("openai", url, f"sk-{uuid.uuid4().hex}")

    async def start(
        self, *, max_attempts: int = 4, **limits: Any
    ) -> tuple[OpenAIProvider, SharedRateLimiter]:
        nc = await nats.connect(self.nats_url)
        self.stack.push_async_callback(nc.close)
        limiter = await SharedRateLimiter.open(nc.jetstream(), scope=self.scope, **limits)
        llm = OpenAIProvider(
            self.url,
            api_key="sk-test",
            model="gpt-4o-mini",
            prices=PriceTable.load(),
            max_wait_s=0.2,
            max_attempts=max_attempts,
            limiter=limiter,
        )
        self.stack.push_async_callback(llm.aclose)
        return llm, limiter


@contextlib.asynccontextmanager
async def replicas(nats_url: str, url: str) -> AsyncIterator[Replicas]:
    async with contextlib.AsyncExitStack() as stack:
        yield Replicas(stack, nats_url, url)


async def test_three_replicas_share_one_rpm(nats_url: str, server: Server) -> None:
    state, url = server
    state.default = answer()
    async with replicas(nats_url, url) as r:
        llms = [(await r.start(rpm=6, tpm=None, max_wait_s=1.5))[0] for _ in range(3)]
        results = await asyncio.gather(
            *(llm.chat(ask(f"task-{i}")) for i in range(3) for llm in llms),
            return_exceptions=True,
        )
    refused = [e for e in results if isinstance(e, BaseException)]
    # Six calls in the minute, whichever replica made them; the other three gave up.
    assert len(state.requests) == 6
    assert len(refused) == 3
    for error in refused:
        assert isinstance(error, RateLimitTimeout)
        assert error.limit == "rpm"
        assert not error.retryable
        message = str(error)
        assert "6 requests per 60 s" in message
        assert "waited" in message
        assert "AGENTBUS_LLM_RPM" in message
        assert "AGENTBUS_LLM_RATE_LIMIT_MAX_WAIT_S" in message


async def test_waiting_calls_go_once_the_window_moves_and_never_exceed_it(
    nats_url: str, server: Server
) -> None:
    state, url = server
    state.default = answer()
    window = 1.5  # a short "minute", so the test waits through two of them
    async with replicas(nats_url, url) as r:
        llms = [
            (await r.start(rpm=3, tpm=None, max_wait_s=20, window_s=window))[0] for _ in range(3)
        ]
        results = await asyncio.gather(
            *(llm.chat(ask(f"task-{i}")) for i in range(3) for llm in llms),
            return_exceptions=True,
        )
    assert not [e for e in results if isinstance(e, BaseException)]
    arrived = sorted(state.arrived)
    assert len(arrived) == 9
    # No three calls apart in less than a window (a margin for the trip to the server).
    gaps = [later - first for first, later in zip(arrived, arrived[3:], strict=False)]
    assert min(gaps) >= window - 0.2


async def test_a_429_slows_down_every_replica(nats_url: str, server: Server) -> None:
    state, url = server
    state.replies += [Scripted(429, {"error": "slow down"}, {"Retry-After": "2"}), answer()]
    async with replicas(nats_url, url) as r:
        first, limiter = await r.start(rpm=1000, tpm=None, max_wait_s=10, max_attempts=1)
        second, _ = await r.start(rpm=1000, tpm=None, max_wait_s=10)
        with pytest.raises(LLMError, match="429"):
            await first.chat(ask("task-1", "from the first replica"))
        assert (await limiter.state()).blocked_until > 0
        reply = await second.chat(ask("task-2", "from the second replica"))
    assert reply.message.content == "ok"
    assert [m["messages"][0]["content"] for m in state.requests] == [
        "from the first replica",
        "from the second replica",
    ]
    # The second replica never saw the 429 itself, yet it held back for the Retry-After
    # (a lower bound, with a margin for clocks; without sharing it comes at once).
    assert state.arrived[1] - state.arrived[0] >= 1.8


async def test_a_task_with_a_backlog_cannot_starve_another(nats_url: str, server: Server) -> None:
    state, url = server
    state.default = answer()
    window = 2.0
    async with replicas(nats_url, url) as r:
        # Big gives up before the third window; small would wait for it.
        big_a, _ = await r.start(rpm=2, tpm=None, window_s=window, max_wait_s=2.6)
        big_b, _ = await r.start(rpm=2, tpm=None, window_s=window, max_wait_s=2.6)
        small, _ = await r.start(rpm=2, tpm=None, window_s=window, max_wait_s=10)
        backlog = [
            asyncio.ensure_future(llm.chat(ask("big", f"big {i}")))
            for i in range(15)
            for llm in (big_a, big_b)
        ]
        await asyncio.sleep(0.3)  # big fills the window and queues the rest
        reply = await small.chat(ask("small", "small"))
        results = await asyncio.gather(*backlog, return_exceptions=True)
    assert reply.message.content == "ok"
    order = [m["messages"][0]["content"] for m in state.requests]
    # The first window is big's (nobody else asked); when it moves on, small is
    # waiting and has used nothing, so it gets one of the next two calls...
    assert order.index("small") <= 3
    # ...while most of big's backlog was still queued (and gave up in the end).
    gave_up = [e for e in results if isinstance(e, RateLimitTimeout)]
    assert len(gave_up) >= 20


async def test_two_replicas_share_one_tpm(nats_url: str, server: Server) -> None:
    state, url = server
    # Each call is counted as its prompt (~20 tokens) + max_tokens 200 until it ends,
    # then as the 150 tokens it used.
    state.default = answer(prompt_tokens=100, completion_tokens=50)
    async with replicas(nats_url, url) as r:
        one, limiter = await r.start(rpm=None, tpm=1000, max_wait_s=1)
        two, _ = await r.start(rpm=None, tpm=1000, max_wait_s=1)
        made = 0
        with pytest.raises(RateLimitTimeout) as info:
            for i in range(10):
                await (one if i % 2 else two).chat(ask(f"task-{i}", max_tokens=200))
                made += 1
        window = await limiter.state()
    # 6 x 150 = 900 used; a seventh (~220 counted) would cross 1000. Without settling
    # to the real use only 4 (4 x ~220) would have fitted.
    assert made == 6
    assert len(state.requests) == 6
    assert window.tokens() == 900
    assert info.value.limit == "tpm"
    assert "1000 tokens per 60 s" in str(info.value)
    assert "AGENTBUS_LLM_TPM" in str(info.value)


async def test_settings_wire_the_limiter_in_one_line(nats_url: str, server: Server) -> None:
    state, url = server
    state.default = answer()
    key = f"sk-{uuid.uuid4().hex}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        unlimited = LLMSettings(base_url=url, model="gpt-4o-mini", api_key=key)
        assert await open_rate_limiter(js, unlimited) is None
        replay = LLMSettings(provider="replay", replay_file="x.json", rpm=1)
        assert await open_rate_limiter(js, replay) is None

        settings = unlimited.model_copy(update={"rpm": 1, "rate_limit_max_wait_s": 0.5})
        limiter = await open_rate_limiter(js, settings)
        assert limiter is not None
        assert key not in limiter.scope
        llm = build_provider(settings, "executor", limiter=limiter)
        try:
            await llm.chat(ask("task-1"))
            with pytest.raises(RateLimitTimeout, match="AGENTBUS_LLM_RPM"):
                await llm.chat(ask("task-1"))
        finally:
            await llm.aclose()
    finally:
        await nc.close()
    assert len(state.requests) == 1
