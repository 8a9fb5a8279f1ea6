"""Every LLM call of a task passes its budget ledger: reserve the worst case, call,
settle to the real usage, and tell the bus (``LLMCalled``, ``BudgetWarning``,
``BudgetExhausted``)."""

from __future__ import annotations

import asyncio
import json
import time

import structlog

from agentbus.contracts import LLMCalled

from ..budget import BudgetLedger, Publish, Spend
from .base import ChatRequest, ChatResponse, LLMProvider
from .pricing import PriceTable

log = structlog.get_logger(__name__)

# Byte-level BPE tokenizers (GPT, Claude, Llama) never make a token of less than one
# byte, so the UTF-8 size of what is sent bounds the prompt's tokens from above. Role
# markers and the provider's rendering of tool schemas add a little: a margin covers it.
_PER_MESSAGE = 16
_MARGIN = 1.1
_BASE = 64


def prompt_token_bound(request: ChatRequest) -> int:
    """An upper bound of the prompt tokens ``request`` can be billed for."""
    size = 0
    for m in request.messages:
        size += len((m.content or "").encode()) + _PER_MESSAGE
        for call in m.tool_calls:
            size += len(call.name) + len(json.dumps(call.arguments, ensure_ascii=False).encode())
    if request.tools:
        size += len(json.dumps([t.model_dump() for t in request.tools]).encode())
    return int(size * _MARGIN) + _BASE


def worst_case(request: ChatRequest, model: str, prices: PriceTable) -> Spend:
    """The most ``request`` can spend: every prompt token uncached, every output token."""
    prompt = prompt_token_bound(request)
    price = prices.lookup(model)
    cost = (prompt * price.input + request.max_tokens * price.output) / 1_000_000 if price else 0.0
    return Spend(cost_usd=cost, tokens=prompt + request.max_tokens, llm_calls=1)


class BudgetedProvider:
    """Wraps a provider; calls without a ``task_id`` pass unbudgeted."""

    def __init__(
        self,
        inner: LLMProvider,
        *,
        ledger: BudgetLedger,
        prices: PriceTable,
        publish: Publish,
        role: str,
        default_model: str = "",
        reservation_ttl_s: float = 600.0,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.ledger = ledger
        self.prices = prices
        self.publish = publish
        self.role = role
        self.default_model = default_model
        self.ttl_s = reservation_ttl_s
        self._unpriced: set[str] = set()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        task_id = request.task_id
        if not task_id:
            return await self.inner.chat(request)
        model = request.model or self.default_model
        if self.prices.lookup(model) is None and model not in self._unpriced:
            self._unpriced.add(model)
            log.warning(
                "no price for this model: its calls count as $0 against cost budgets; "
                "add it to AGENTBUS_LLM_PRICES_FILE",
                model=model,
            )
        want = worst_case(request, model, self.prices)
        started = time.perf_counter()
        step_id = request.step_id or ""
        reported: asyncio.Future[object] | None = None
        try:
            async with self.ledger.hold(
                task_id, want, publish=self.publish, step_id=step_id, ttl_s=self.ttl_s
            ) as hold:
                response = await self.inner.chat(request)
                usage = response.usage
                hold.actual = Spend(cost_usd=usage.cost_usd, tokens=usage.total_tokens, llm_calls=1)
                called = LLMCalled(
                    task_id=task_id,
                    role=self.role,
                    step_id=step_id,
                    conversation=request.conversation,
                    model=response.model,
                    usage=usage,
                    reserved_tokens=want.tokens,
                    reserved_cost_usd=want.cost_usd,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
                # On its way while the ledger settles: two round trips at once.
                reported = asyncio.ensure_future(self.publish(called))
        finally:
            if reported is not None:
                await reported
        return response
