"""The LLM client: one provider interface, adapters per wire format, a replay provider."""

from __future__ import annotations

from typing import Literal

from nats.js import JetStreamContext

from ..settings import LLMSettings
from ._http import RateGate
from .anthropic import ANTHROPIC_API_URL, ANTHROPIC_VERSION, AnthropicProvider
from .base import ChatRequest, ChatResponse, LLMError, LLMProvider, Message, ToolCall, ToolSpec
from .openai import OpenAIProvider
from .pricing import Price, PriceTable
from .ratelimit import (
    Permit,
    RateLimitMetrics,
    RateLimitTimeout,
    SharedRateLimiter,
    limiter_scope,
)
from .recording import RecordingProvider, build_transcript
from .replay import ReplayMismatch, ReplayProvider, Transcript

NOT_CONFIGURED_HINT = """no LLM is configured. Point agentbus at an OpenAI-compatible endpoint:
    export AGENTBUS_LLM_BASE_URL=https://api.openai.com/v1  # Ollama: http://localhost:11434/v1
    export AGENTBUS_LLM_MODEL=gpt-4o-mini
    export AGENTBUS_LLM_API_KEY=sk-...                        # if the endpoint needs one
or at Anthropic's Messages API:
    export AGENTBUS_LLM_PROVIDER=anthropic
    export AGENTBUS_LLM_MODEL=claude-sonnet-4-20250514
    export AGENTBUS_LLM_API_KEY=sk-ant-...
or run the offline demo, which replays a recorded model:
    make demo          (or: agentbus run --replay examples/primes)"""


def build_provider(
    settings: LLMSettings,
    role: Literal["planner", "executor"],
    *,
    limiter: RateGate | None = None,
    prices: PriceTable | None = None,
) -> LLMProvider:
    """The provider for one role; raises LLMError with a how-to when none is configured.
    Every HTTP call passes ``limiter`` when given (see :func:`open_rate_limiter`); the
    replay provider makes no calls and ignores it. ``prices`` defaults to the table
    ``AGENTBUS_LLM_PRICES_FILE`` names."""
    prices = prices or PriceTable.load(settings.prices_file)
    provider = _base_provider(settings, role, limiter, prices)
    if settings.record_dir is not None:
        return RecordingProvider(provider, settings.record_dir)
    return provider


async def open_rate_limiter(
    js: JetStreamContext, settings: LLMSettings, *, metrics: RateLimitMetrics | None = None
) -> SharedRateLimiter | None:
    """The rate limiter all replicas share for the configured provider, endpoint and API
    key (AGENTBUS_LLM_RPM / AGENTBUS_LLM_TPM); None when no limit is set or the provider
    makes no calls (replay)."""
    kind = settings.resolved_provider
    if kind not in ("openai", "anthropic") or not (settings.rpm or settings.tpm):
        return None
    base_url = settings.base_url or (ANTHROPIC_API_URL if kind == "anthropic" else "")
    key = settings.api_key.get_secret_value() if settings.api_key else None
    return await SharedRateLimiter.open(
        js,
        scope=limiter_scope(kind, base_url, key),
        rpm=settings.rpm,
        tpm=settings.tpm,
        max_wait_s=settings.rate_limit_max_wait_s,
        metrics=metrics,
    )


def _base_provider(
    settings: LLMSettings,
    role: Literal["planner", "executor"],
    limiter: RateGate | None,
    prices: PriceTable,
) -> LLMProvider:
    kind = settings.resolved_provider
    if kind == "replay":
        if settings.replay_file is None:
            raise LLMError("AGENTBUS_LLM_PROVIDER=replay needs AGENTBUS_LLM_REPLAY_FILE")
        return ReplayProvider.from_file(settings.replay_file, prices)
    model = settings.model_for(role)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    if kind == "openai":
        if not settings.base_url or not model:
            raise LLMError(
                "the OpenAI-compatible provider needs AGENTBUS_LLM_BASE_URL and AGENTBUS_LLM_MODEL"
            )
        return OpenAIProvider(
            settings.base_url,
            api_key=key,
            model=model,
            prices=prices,
            timeout_s=settings.timeout_s,
            limiter=limiter,
        )
    if kind == "anthropic":
        # A key is optional only behind a proxy of one's own (a base URL is set).
        if not model or not (key or settings.base_url):
            raise LLMError(
                "the Anthropic provider needs AGENTBUS_LLM_MODEL and AGENTBUS_LLM_API_KEY "
                f"(AGENTBUS_LLM_BASE_URL defaults to {ANTHROPIC_API_URL})"
            )
        return AnthropicProvider(
            settings.base_url or ANTHROPIC_API_URL,
            api_key=key,
            model=model,
            prices=prices,
            timeout_s=settings.timeout_s,
            limiter=limiter,
        )
    raise LLMError(NOT_CONFIGURED_HINT)


__all__ = [
    "ANTHROPIC_API_URL",
    "ANTHROPIC_VERSION",
    "NOT_CONFIGURED_HINT",
    "AnthropicProvider",
    "ChatRequest",
    "ChatResponse",
    "LLMError",
    "LLMProvider",
    "Message",
    "OpenAIProvider",
    "Permit",
    "Price",
    "PriceTable",
    "RateGate",
    "RateLimitMetrics",
    "RateLimitTimeout",
    "RecordingProvider",
    "ReplayMismatch",
    "ReplayProvider",
    "SharedRateLimiter",
    "ToolCall",
    "ToolSpec",
    "Transcript",
    "build_provider",
    "build_transcript",
    "limiter_scope",
    "open_rate_limiter",
]
