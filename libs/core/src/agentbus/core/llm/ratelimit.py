"""A rate limiter for LLM calls shared by every replica of every service: requests per
minute (RPM) and tokens per minute (TPM) per provider and API key.

The state of one limiter is one record in a JetStream key-value bucket, changed with
compare-and-set, so all replicas count against the same window:

* the last minute in 60 slices, each holding the requests and tokens of every task
  that called in it (a slice leaves the window one slice late, so the limit holds in
  every 60 s window, never a little more);
* ``blocked_until``: a provider's HTTP 429 Retry-After, so every replica backs off;
* the calls waiting now and their tasks (a waiting call re-checks at least every
  second; one that has not re-checked for a few seconds has gone).

Fairness: when the window has room, the waiting task that has used least of it goes
first (max-min fairness over the dominant resource: a task's use is the larger of its
share of the RPM and its share of the TPM). So a task with a backlog takes at most
its share while others wait, and all the room when nobody else does.

:func:`decide` is plain code over the state; :class:`SharedRateLimiter` runs it in a
compare-and-set loop over the bucket and sleeps while the answer is "not yet".
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from agentbus.contracts import subjects

from ..kv import CasStore, StateConflictError, open_bucket
from .base import LLMError

log = structlog.get_logger(__name__)

R = TypeVar("R")

WINDOW_S = 60.0  # the "minute" of RPM and TPM
SLICES = 60  # slices per window: 1 s each for a minute
WAITING_TTL_S = 5.0  # a waiter that has not re-checked for this long has gone
WAITING_REFRESH_S = 1.0  # a waiter's mark is rewritten at most this often
FAIR_RECHECK_S = 0.2  # a task held back for fairness looks again this soon
MAX_SLEEP_S = 1.0  # waiters re-check at least this often (and keep their mark fresh)
JITTER_S = 0.1  # spread the re-checks of many waiters
CAS_ATTEMPTS = 200
ANONYMOUS_TASK = "-"  # calls without a task id share one fair share
RECORD_TTL_S = 24 * 3600.0  # the record of a limiter nobody used for a day goes

Limit = Literal["rpm", "tpm", "retry-after", "fair share"]


class Limits(BaseModel):
    """The limits of one limiter; None or 0 is no limit on that dimension."""

    model_config = ConfigDict(frozen=True)

    rpm: int | None = Field(None, ge=0, description="Requests per window.")
    tpm: int | None = Field(None, ge=0, description="Tokens per window.")
    window_s: float = Field(WINDOW_S, gt=0, description="The window, 60 s for per-minute.")

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    @property
    def slice_s(self) -> float:
        return self.window_s / SLICES

    def slice_of(self, now: float) -> int:
        return math.floor(now / self.slice_s)

    def leaves_at(self, index: int) -> float:
        """When slice ``index`` has left the window: one window after its end."""
        return (index + 1) * self.slice_s + self.window_s


class Slice(BaseModel):
    """The calls granted in one slice of the window, by task."""

    index: int = Field(description="floor(epoch seconds / slice length).")
    requests: dict[str, int] = Field(default_factory=dict, description="Requests by task.")
    tokens: dict[str, int] = Field(
        default_factory=dict, description="Tokens by task: estimates, settled to the real use."
    )


class Waiter(BaseModel):
    """A call that is waiting for room."""

    task: str = Field(description="The task of the call.")
    seen: float = Field(description="Epoch seconds the call last asked.")


class WindowState(BaseModel):
    """The shared record of one limiter (one provider + base URL + API key)."""

    slices: list[Slice] = Field(default_factory=list, description="Oldest first.")
    blocked_until: float = Field(
        0.0, description="Epoch seconds before which nobody calls (the provider's Retry-After)."
    )
    waiting: dict[str, Waiter] = Field(
        default_factory=dict, description="Waiting calls by call id."
    )

    def requests(self) -> int:
        return sum(sum(s.requests.values()) for s in self.slices)

    def tokens(self) -> int:
        return sum(sum(s.tokens.values()) for s in self.slices)


class Decision(NamedTuple):
    granted: bool
    wait_s: float  # when not granted: how soon a retry may succeed
    state: WindowState  # the state to save
    limit: Limit | None = None  # when not granted: what holds the call back (the longest wait)
    certain_wait_s: float = 0.0  # the part of wait_s nothing can shorten (RPM window, 429)
    slice: int = 0  # the slice of ``now``: where a granted call was counted


def prune(state: WindowState, limits: Limits, now: float) -> WindowState:
    """A copy without the slices that left the window and the waiters that left."""
    return WindowState(
        slices=[s.model_copy(deep=True) for s in state.slices if limits.leaves_at(s.index) > now],
        blocked_until=state.blocked_until,
        waiting={
            call: w.model_copy()
            for call, w in state.waiting.items()
            if now - w.seen < WAITING_TTL_S
        },
    )


def task_use(state: WindowState, limits: Limits, task: str) -> float:
    """The task's share of the window on its dominant dimension (0..1, more if over)."""
    use = 0.0
    if limits.rpm:
        use = max(use, sum(s.requests.get(task, 0) for s in state.slices) / limits.rpm)
    if limits.tpm:
        use = max(use, sum(s.tokens.get(task, 0) for s in state.slices) / limits.tpm)
    return use


def _time_until(
    state: WindowState,
    limits: Limits,
    now: float,
    amount: Callable[[Slice], int],
    fits: Callable[[int], bool],
) -> float:
    """Seconds until ``fits(total in the window)`` holds as the oldest slices leave."""
    total = sum(amount(s) for s in state.slices)
    if fits(total):
        return 0.0
    for s in state.slices:
        total -= amount(s)
        if fits(total):
            return max(0.0, limits.leaves_at(s.index) - now)
    return 0.0  # pragma: no cover - an empty window always fits


def decide(
    state: WindowState,
    limits: Limits,
    *,
    now: float,
    task_id: str | None,
    tokens: int,
    call_id: str | None = None,
) -> Decision:
    """May ``task_id`` make a call of about ``tokens`` tokens at ``now``? ``call_id``
    names this call while it waits (default: the task; give each concurrent call its own,
    so a task stays marked as waiting while any of its calls waits).

    Granted when nobody is blocked by a Retry-After, the window holds fewer than ``rpm``
    requests, its tokens plus these fit ``tpm`` (one call larger than ``tpm`` passes
    when the window has no tokens, else it could never run), and no other waiting task
    has used less of the window than this one. A granted call is counted in the state;
    a refused one is marked as waiting."""
    task = task_id or ANONYMOUS_TASK
    call = call_id or task
    tokens = max(0, tokens)
    current = prune(state, limits, now)
    waits: list[tuple[Limit, float, bool]] = []  # (limit, seconds, certain)
    if now < current.blocked_until:
        waits.append(("retry-after", current.blocked_until - now, True))
    if limits.rpm:
        rpm = limits.rpm
        wait = _time_until(
            current, limits, now, lambda s: sum(s.requests.values()), lambda n: n < rpm
        )
        if wait > 0:
            waits.append(("rpm", wait, True))
    if limits.tpm:
        tpm = limits.tpm
        wait = _time_until(
            current,
            limits,
            now,
            lambda s: sum(s.tokens.values()),
            lambda n: n == 0 or n + tokens <= tpm,
        )
        if wait > 0:
            # Not certain: settling a call to its real use may free tokens sooner.
            waits.append(("tpm", wait, False))
    if not waits:
        mine = task_use(current, limits, task)
        others = {w.task for w in current.waiting.values() if w.task != task}
        if any(task_use(current, limits, t) < mine for t in others):
            waits.append(("fair share", FAIR_RECHECK_S, False))
    if waits:
        limit, wait_s, _ = max(waits, key=lambda w: w[1])
        certain = max((w[1] for w in waits if w[2]), default=0.0)
        mark = current.waiting.get(call)
        if mark is None or now - mark.seen >= WAITING_REFRESH_S:
            current.waiting[call] = Waiter(task=task, seen=now)
        return Decision(False, wait_s, current, limit, certain, limits.slice_of(now))
    index = limits.slice_of(now)
    slot = _slice(current, index)
    slot.requests[task] = slot.requests.get(task, 0) + 1
    slot.tokens[task] = slot.tokens.get(task, 0) + tokens
    current.waiting.pop(call, None)
    return Decision(True, 0.0, current, slice=index)


def _slice(state: WindowState, index: int) -> Slice:
    """The slice ``index``, added in order if missing (clocks of replicas differ a little)."""
    for pos, s in enumerate(state.slices):
        if s.index == index:
            return s
        if s.index > index:
            state.slices.insert(pos, Slice(index=index))
            return state.slices[pos]
    state.slices.append(Slice(index=index))
    return state.slices[-1]


def corrected(state: WindowState, *, index: int, task: str, delta: int) -> WindowState | None:
    """The state with ``delta`` tokens added to ``task`` in slice ``index``; None when
    that slice has left the window (nothing to correct)."""
    for s in state.slices:
        if s.index == index and task in s.tokens:
            new = state.model_copy(deep=True)
            slot = next(x for x in new.slices if x.index == index)
            slot.tokens[task] = max(0, slot.tokens[task] + delta)
            return new
    return None


def throttled(state: WindowState, until: float) -> WindowState | None:
    """The state blocked until ``until``; None when it already is, as long or longer."""
    if state.blocked_until >= until:
        return None
    return state.model_copy(update={"blocked_until": until})


def limiter_scope(provider: str, base_url: str, api_key: str | None) -> str:
    """The KV key of the limiter for one provider, endpoint and API key: the provider
    kind and a hash, never the key itself."""
    material = "\n".join((provider, base_url.strip().rstrip("/"), api_key or ""))
    digest = hashlib.sha256(material.encode()).hexdigest()[:32]
    kind = re.sub(r"[^A-Za-z0-9_-]", "_", provider) or "llm"
    return f"{kind}.{digest}"


@dataclass(frozen=True)
class Permit:
    """A granted call: where it was counted, so its tokens can be settled."""

    scope: str
    slice: int
    task: str
    tokens: int


class RateLimitTimeout(LLMError):
    """The call was not made: a shared rate limit held it back longer than allowed.
    ``limit`` is ``rpm``, ``tpm``, ``retry-after`` or ``fair share``."""

    def __init__(self, message: str, *, limit: Limit, waited_s: float) -> None:
        super().__init__(message, retryable=False)
        self.limit = limit
        self.waited_s = waited_s


class RateLimitMetrics:
    """Calls that had to wait, calls that gave up, and 429s shared with every replica."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.waits = Counter(
            "agentbus_llm_rate_limit_waits",
            "LLM calls that waited for the shared rate limit, by what held them.",
            ("limit",),
            registry=registry,
        )
        self.timeouts = Counter(
            "agentbus_llm_rate_limit_timeouts",
            "LLM calls not made: the shared rate limit held them longer than allowed.",
            ("limit",),
            registry=registry,
        )
        self.throttles = Counter(
            "agentbus_llm_rate_limit_throttles",
            "HTTP 429s whose Retry-After was shared with every replica.",
            registry=registry,
        )


_HINTS: dict[Limit, str] = {
    "rpm": "raise AGENTBUS_LLM_RPM if the provider allows more",
    "tpm": "raise AGENTBUS_LLM_TPM if the provider allows more, or lower "
    "AGENTBUS_LLM_MAX_TOKENS (calls are counted with their most output tokens until they end)",
    "retry-after": "the provider's own limit is lower than ours: lower AGENTBUS_LLM_RPM / "
    "AGENTBUS_LLM_TPM to match it",
    "fair share": "other tasks waiting for the same limit went first; raise "
    "AGENTBUS_LLM_RPM / AGENTBUS_LLM_TPM if the provider allows more",
}


class SharedRateLimiter:
    """One limiter (one provider + base URL + API key) in a JetStream KV bucket; every
    replica that opens the same ``scope`` shares it. Implements the transport's
    ``RateGate``: :meth:`acquire` before a call, :meth:`settle` after it,
    :meth:`throttle` on a 429."""

    def __init__(
        self,
        kv: KeyValue,
        *,
        scope: str,
        limits: Limits,
        max_wait_s: float,
        bucket: str = subjects.RATE_LIMIT_BUCKET,
        metrics: RateLimitMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not limits.enabled:
            raise ValueError("a rate limiter needs an RPM or a TPM limit; with none, use none")
        self.bucket = bucket
        self._store = CasStore(kv, WindowState)
        self.scope = scope
        self.limits = limits
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self._clock = clock

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        *,
        scope: str,
        rpm: int | None,
        tpm: int | None,
        max_wait_s: float,
        bucket: str = subjects.RATE_LIMIT_BUCKET,
        window_s: float = WINDOW_S,
        metrics: RateLimitMetrics | None = None,
    ) -> SharedRateLimiter:
        """The limiter ``scope`` (see :func:`limiter_scope`), creating the bucket (file
        storage, no history) if missing. ``window_s`` is the minute of RPM/TPM; tests
        shorten it."""
        kv = await open_bucket(js, bucket, ttl_s=RECORD_TTL_S)
        limits = Limits(rpm=rpm or None, tpm=tpm or None, window_s=window_s)
        return cls(
            kv, scope=scope, limits=limits, max_wait_s=max_wait_s, bucket=bucket, metrics=metrics
        )

    async def acquire(self, task_id: str | None, tokens: int) -> Permit:
        """Wait for room for one call of about ``tokens`` tokens and count it.

        Raises :class:`RateLimitTimeout` when the room will not come within
        ``max_wait_s`` (at once when it certainly cannot: the RPM window or a provider's
        Retry-After ends later)."""
        task = task_id or ANONYMOUS_TASK
        call = uuid.uuid4().hex[:16]
        started = time.monotonic()
        counted = False
        while True:
            decision = await self._change(
                lambda state, now: _saved(
                    decide(state, self.limits, now=now, task_id=task, tokens=tokens, call_id=call)
                )
            )
            waited = time.monotonic() - started
            if decision.granted:
                if counted:
                    log.info("llm.rate_limit.waited", scope=self.scope, waited_s=round(waited, 2))
                return Permit(self.scope, decision.slice, task, max(0, tokens))
            limit = decision.limit or "rpm"
            remaining = self.max_wait_s - waited
            if remaining <= 0 or decision.certain_wait_s > remaining:
                await self._forget_waiter(call)
                if self.metrics:
                    self.metrics.timeouts.labels(limit=limit).inc()
                raise self._timeout(decision, limit, waited, tokens)
            if not counted:
                counted = True
                if self.metrics:
                    self.metrics.waits.labels(limit=limit).inc()
            jitter = random.uniform(0, JITTER_S)  # noqa: S311 - not for security
            await asyncio.sleep(min(decision.wait_s, MAX_SLEEP_S, remaining) + jitter)

    async def settle(self, permit: Permit, actual_tokens: int) -> None:
        """Count the call with its real tokens instead of the estimate (best effort:
        nothing to do once its slice has left the window)."""
        delta = max(0, actual_tokens) - permit.tokens
        if delta == 0 or not self.limits.tpm:
            return
        try:
            await self._change(
                lambda state, _now: (
                    corrected(state, index=permit.slice, task=permit.task, delta=delta),
                    None,
                )
            )
        except (LLMError, NatsError) as exc:
            log.warning("llm.rate_limit.settle_failed", scope=self.scope, error=repr(exc))

    async def throttle(self, retry_after_s: float) -> None:
        """Hold every replica's calls for ``retry_after_s`` (a provider's 429)."""
        if retry_after_s <= 0:
            return
        try:
            await self._change(lambda state, now: (throttled(state, now + retry_after_s), None))
        except (LLMError, NatsError) as exc:
            log.warning("llm.rate_limit.throttle_failed", scope=self.scope, error=repr(exc))
            return
        if self.metrics:
            self.metrics.throttles.inc()
        log.info("llm.rate_limit.throttled", scope=self.scope, retry_after_s=retry_after_s)

    async def state(self) -> WindowState:
        """The shared state as stored (for tests and inspection)."""
        loaded = await self._store.load(self.scope)
        return loaded[0] if loaded else WindowState()

    async def _forget_waiter(self, call: str) -> None:
        """A call that gives up stops holding others back (best effort)."""

        def forget(state: WindowState, _now: float) -> tuple[WindowState | None, None]:
            if call not in state.waiting:
                return None, None
            new = state.model_copy(deep=True)
            del new.waiting[call]
            return new, None

        try:
            await self._change(forget)
        except (LLMError, NatsError) as exc:
            log.warning("llm.rate_limit.forget_failed", scope=self.scope, error=repr(exc))

    def _timeout(self, decision: Decision, limit: Limit, waited: float, tokens: int) -> LLMError:
        what = {
            "rpm": f"{self.limits.rpm} requests per {self.limits.window_s:g} s",
            "tpm": f"{self.limits.tpm} tokens per {self.limits.window_s:g} s "
            f"(this call counts {tokens})",
            "retry-after": "the provider's Retry-After (HTTP 429), shared by every replica",
            "fair share": "its fair share while other tasks wait",
        }[limit]
        return RateLimitTimeout(
            f"LLM rate limit reached ({limit}: {what}, limiter {self.scope}): waited "
            f"{waited:.1f} s of at most {self.max_wait_s:g} s and room comes in "
            f"{decision.wait_s:.1f} s at the earliest; {_HINTS[limit]}, or raise "
            "AGENTBUS_LLM_RATE_LIMIT_MAX_WAIT_S to wait longer",
            limit=limit,
            waited_s=waited,
        )

    async def _change(
        self, change: Callable[[WindowState, float], tuple[WindowState | None, R]]
    ) -> R:
        """Compare-and-set: apply ``change(state, now)`` and save its new state (None or
        an equal state saves nothing), retrying when another replica wrote first."""
        results: list[R] = []

        def apply(current: WindowState | None) -> WindowState | None:
            state = current or WindowState()
            new, result = change(state, self._clock())
            results[:] = [result]
            return None if new is None or new == state else new

        try:
            await self._store.mutate(self.scope, apply, attempts=CAS_ATTEMPTS)
        except StateConflictError as exc:
            raise LLMError(
                f"the shared LLM rate limiter {self.scope} is too busy: {exc}", retryable=True
            ) from exc
        except NatsError as exc:
            raise LLMError(
                f"the shared LLM rate limiter {self.scope} is unreachable (JetStream KV "
                f"bucket {self.bucket!r}): {exc!r}",
                retryable=True,
            ) from exc
        return results[0]


def _saved(decision: Decision) -> tuple[WindowState, Decision]:
    return decision.state, decision
