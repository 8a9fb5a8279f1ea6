"""Every LLM call of a task passes its budget ledger: reserve the worst case, call,
settle to the real usage, and tell the bus (``LLMCalled``, ``BudgetWarning``,
``BudgetExhausted``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass

import structlog

from agentbus.contracts import LLMCalled

from ..budget import BudgetLedger, BudgetRefused, LedgerStatus, Publish, Spend
from .base import ChatRequest, ChatResponse, LLMError, LLMProvider
from .pricing import PriceTable

log = structlog.get_logger(__name__)

# Byte-level BPE tokenizers (GPT, Claude, Llama) never make a token of less than one
# byte, so the UTF-8 size of what is sent bounds the prompt's tokens from above. Role
# markers and the provider's rendering of tool schemas add a little: a margin covers it.
_PER_MESSAGE = 16
_MARGIN = 1.1
_BASE = 64


@dataclass(frozen=True)
class Measured:
    """A request's messages: each one's byte size and the fingerprint of the dialogue
    up to and including it (tools included); and the tools' size."""

    sizes: list[int]
    prints: list[int]
    tools: int

    @classmethod
    def of(cls, request: ChatRequest) -> Measured:
        tools = json.dumps([t.model_dump() for t in request.tools]) if request.tools else ""
        fingerprint = hash(tools)
        sizes, prints = [], []
        for m in request.messages:
            # As the adapters send them: arguments as ASCII-escaped JSON (a CJK character
            # is six bytes there), and the ids that pair calls with results.
            calls = tuple((c.id, c.name, json.dumps(c.arguments)) for c in m.tool_calls)
            size = len((m.content or "").encode()) + len(m.tool_call_id or "") + _PER_MESSAGE
            size += sum(len(i) + len(name) + len(arguments) for i, name, arguments in calls)
            fingerprint = hash((fingerprint, m.role, m.content, m.tool_call_id, calls))
            sizes.append(size)
            prints.append(fingerprint)
        return cls(sizes, prints, len(tools.encode()))

    def bound(self, start: int = 0) -> int:
        """The bytes bound of messages ``start`` onwards (with the tools if from 0)."""
        size = sum(self.sizes[start:]) + (self.tools if start == 0 else 0)
        return int(size * _MARGIN) + _BASE


def prompt_token_bound(request: ChatRequest) -> int:
    """An upper bound of the prompt tokens ``request`` can be billed for."""
    return Measured.of(request).bound()


@dataclass(frozen=True)
class _Billed:
    messages: int  # the dialogue's length when it was billed
    fingerprint: int  # of those messages and the tools
    prompt_tokens: int  # what the provider billed for them


class DialogueBounds:
    """Tighter prompt bounds for dialogues that grow by appending (a step's tool loop).

    A call's prompt is the last call's prompt plus what was appended since (the reply
    and the tool results). Its tokens are at most the tokens the provider billed for
    the last prompt plus the bytes bound of the new messages: chat templates put
    special tokens between messages, so no token spans the seam. The bytes bound alone
    overstates English text about 4x; this keeps only the new messages' part of that.
    Any change to the earlier messages or the tools (the fingerprint) falls back to
    the bytes bound of the whole request.
    """

    def __init__(self, size: int = 4096) -> None:
        self._billed: OrderedDict[tuple[str, str], _Billed] = OrderedDict()
        self._size = size

    def bound(self, key: tuple[str, str], measured: Measured) -> int:
        full = measured.bound()
        billed = self._billed.get(key)
        if billed is None or not 0 < billed.messages <= len(measured.sizes):
            return full
        if measured.prints[billed.messages - 1] != billed.fingerprint:
            return full
        return min(full, billed.prompt_tokens + measured.bound(billed.messages))

    def learn(self, key: tuple[str, str], measured: Measured, prompt_tokens: int) -> None:
        if not measured.sizes or prompt_tokens <= 0:
            return
        self._billed[key] = _Billed(len(measured.sizes), measured.prints[-1], prompt_tokens)
        self._billed.move_to_end(key)
        while len(self._billed) > self._size:
            self._billed.popitem(last=False)


def worst_case(
    request: ChatRequest, model: str, prices: PriceTable, *, prompt_tokens: int | None = None
) -> Spend:
    """The most ``request`` can spend: every prompt token uncached, every output token.
    ``prompt_tokens`` is a known bound of the prompt (else its bytes bound)."""
    prompt = prompt_token_bound(request) if prompt_tokens is None else prompt_tokens
    price = prices.lookup(model)
    cost = (prompt * price.input + request.max_tokens * price.output) / 1_000_000 if price else 0.0
    return Spend(cost_usd=cost, tokens=prompt + request.max_tokens, llm_calls=1)


def _report(publishing: Awaitable[object]) -> asyncio.Future[object]:
    """Publish in the background; a failure is logged even if nobody awaits it (the
    settle failed first, or the caller was cancelled)."""
    future = asyncio.ensure_future(publishing)

    def done(f: asyncio.Future[object]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("could not publish LLMCalled", error=repr(f.exception()))

    future.add_done_callback(done)
    return future


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
        self._dialogues = DialogueBounds()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def _refuse_unpriced(self, task_id: str, model: str) -> None:
        """A model with no price cannot be held to a cost budget: a task with one fails
        its call with the fix; other tasks' calls count $0 (logged once per model)."""
        ledger = await self.ledger.load(task_id)
        if ledger is not None and ledger.status is LedgerStatus.CLOSED:
            raise BudgetRefused(ledger.closed_reason or "the task has ended", closed=True)
        if ledger is not None and ledger.limits.cost_usd is not None:
            raise LLMError(
                f"model {model!r} has no price, so this task's cost budget cannot be "
                "enforced: add the model to the price table (AGENTBUS_LLM_PRICES_FILE, "
                "USD per 1M tokens) or run the task without a cost budget"
            )
        if model not in self._unpriced:
            self._unpriced.add(model)
            log.warning(
                "no price for this model: its calls count as $0; add it to "
                "AGENTBUS_LLM_PRICES_FILE before giving tasks a cost budget",
                model=model,
            )

    async def chat(self, request: ChatRequest) -> ChatResponse:
        task_id = request.task_id
        if not task_id:
            return await self.inner.chat(request)
        model = request.model or self.default_model
        if self.prices.lookup(model) is None:
            await self._refuse_unpriced(task_id, model)
        dialogue = (task_id, request.conversation)
        measured = Measured.of(request)
        prompt_bound = self._dialogues.bound(dialogue, measured)
        want = worst_case(request, model, self.prices, prompt_tokens=prompt_bound)
        started = time.perf_counter()
        step_id = request.step_id or ""
        async with self.ledger.hold(
            task_id, want, publish=self.publish, step_id=step_id, ttl_s=self.ttl_s
        ) as hold:
            response = await self.inner.chat(request)
            usage = response.usage
            self._dialogues.learn(dialogue, measured, usage.prompt_tokens)
            hold.actual = Spend(cost_usd=usage.cost_usd, tokens=usage.total_tokens, llm_calls=1)
            # On its way while the ledger settles (two round trips at once), and on to
            # the end even if this step is cancelled meanwhile: the call was made.
            reported = _report(
                self.publish(
                    LLMCalled(
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
                )
            )
        await asyncio.shield(reported)
        return response
