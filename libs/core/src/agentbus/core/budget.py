"""The task's budget ledger: reserve the worst case before spending, settle to the truth.

One record per task in a JetStream KV bucket, changed with compare-and-set, shared by
every replica of the planner and the executor, so concurrent steps of one task can never
spend past its budget together, and the ledger survives restarts.

Rules:

* Before an LLM call the caller reserves the call's worst case (prompt tokens bounded
  from above, plus the most output tokens it allows, priced). The call is made only if
  ``spent + reserved + worst case`` fits every limit.
* If it would fit once other callers' reservations settle, the caller waits for them.
  If it cannot fit even then, the budget is exhausted: the ledger pauses (every later
  reservation of the task is refused) until an approval adds budget, and the caller
  that paused it publishes ``BudgetExhausted``.
* After the call the reservation is replaced by the real usage. A budget crossing 80%
  for the first time (per approval round) yields a ``BudgetWarning``.
* A cancelled or finished task's ledger is closed: reservations are released and every
  later reservation is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from nats.js import JetStreamContext
from pydantic import BaseModel, Field

from agentbus.contracts import (
    Budget,
    BudgetExhausted,
    BudgetFigure,
    BudgetKind,
    BudgetWarning,
    Event,
    OnBudget,
    derived_event_id,
    new_id,
    subjects,
    utcnow,
)

from .kv import CasStore, open_bucket
from .llm.base import BudgetRefused

Publish = Callable[[Event], Awaitable[object]]

WARN_AT = 0.8
# Joins a BudgetExhausted reason (what ran out) to how to approve more.
_WAITING_FOR_APPROVAL = "; waiting for approval: "
_SETTLED_KEEP = 200


class Spend(BaseModel):
    """Amounts of each budgeted kind (wall time is the planner's, not the ledger's)."""

    cost_usd: float = 0.0
    tokens: int = 0
    llm_calls: int = 0
    sandbox_cpu: float = 0.0

    def get(self, kind: BudgetKind) -> float:
        return float(getattr(self, _FIELD[kind]))

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            cost_usd=self.cost_usd + other.cost_usd,
            tokens=self.tokens + other.tokens,
            llm_calls=self.llm_calls + other.llm_calls,
            sandbox_cpu=self.sandbox_cpu + other.sandbox_cpu,
        )


_FIELD = {
    BudgetKind.COST: "cost_usd",
    BudgetKind.TOKENS: "tokens",
    BudgetKind.LLM_CALLS: "llm_calls",
    BudgetKind.SANDBOX_CPU: "sandbox_cpu",
}
LEDGER_KINDS = tuple(_FIELD)

_UNITS = {
    BudgetKind.COST: lambda v: f"${v:.4f}",
    BudgetKind.TOKENS: lambda v: f"{v:,.0f} tokens",
    BudgetKind.LLM_CALLS: lambda v: f"{v:.0f} LLM calls",
    BudgetKind.SANDBOX_CPU: lambda v: f"{v:.1f} sandbox CPU-seconds",
    BudgetKind.TIME: lambda v: f"{v:.0f} s",
}
_FLAGS = {
    BudgetKind.COST: "--add-cost USD",
    BudgetKind.TOKENS: "--add-tokens N",
    BudgetKind.LLM_CALLS: "--add-calls N",
    BudgetKind.SANDBOX_CPU: "--add-cpu SECONDS",
    BudgetKind.TIME: "--add-time 10m",
}


def amount(kind: BudgetKind, value: float) -> str:
    return _UNITS[kind](value)


def approve_hint(task_id: str, kind: BudgetKind) -> str:
    return f"agentbus approve {task_id} {_FLAGS[kind]}"


class Limits(BaseModel):
    """The ledger's limits; None is no limit."""

    cost_usd: float | None = None
    tokens: int | None = None
    llm_calls: int | None = None
    sandbox_cpu: float | None = None

    def get(self, kind: BudgetKind) -> float | None:
        value = getattr(self, _FIELD[kind])
        return None if value is None else float(value)

    @classmethod
    def of(cls, budget: Budget) -> Limits:
        return cls(
            cost_usd=budget.max_cost_usd,
            tokens=budget.max_tokens,
            llm_calls=budget.max_llm_calls,
            sandbox_cpu=budget.max_sandbox_cpu_seconds,
        )

    def extended(self, add: Spend) -> Limits:
        """More budget: limits grow by ``add``; unlimited kinds stay unlimited."""
        grown = {
            name: None if getattr(self, name) is None else getattr(self, name) + getattr(add, name)
            for name in _FIELD.values()
        }
        return Limits.model_validate(grown)


class Reservation(BaseModel):
    amount: Spend
    step_id: str = ""
    expires_at: float = Field(description="Epoch seconds; a crashed caller's hold lapses then.")


class LedgerStatus(StrEnum):
    OPEN = "open"
    PAUSED = "paused"  # a budget ran out; refused until approved
    CLOSED = "closed"  # cancelled or finished; refused for good


class Exhaustion(BaseModel):
    kind: BudgetKind
    used: float
    limit: float
    needed: float
    step_id: str = ""
    reason: str


class Ledger(BaseModel):
    task_id: str
    limits: Limits
    policy: OnBudget = OnBudget.PAUSE
    approval_timeout_s: float = 3600.0
    spent: Spend = Field(default_factory=Spend)
    reservations: dict[str, Reservation] = Field(default_factory=dict)
    status: LedgerStatus = LedgerStatus.OPEN
    exhausted: Exhaustion | None = None
    closed_reason: str = ""
    round: int = Field(0, description="Approvals applied so far.")
    approvals: list[str] = Field(default_factory=list, description="Approval event ids applied.")
    warned: list[BudgetKind] = Field(default_factory=list, description="Warned this round.")
    settled: list[str] = Field(default_factory=list, description="Recent settled reservations.")

    # --- queries ---------------------------------------------------------------------

    @property
    def reserved(self) -> Spend:
        total = Spend()
        for r in self.reservations.values():
            total = total + r.amount
        return total

    def figure(self, kind: BudgetKind) -> BudgetFigure | None:
        limit = self.limits.get(kind)
        if limit is None or limit <= 0:
            return None
        return BudgetFigure(kind=kind, used=self.spent.get(kind), limit=limit)

    def remaining(self, kind: BudgetKind) -> float | None:
        limit = self.limits.get(kind)
        return None if limit is None else max(0.0, limit - self.spent.get(kind))

    def describe_remaining(self) -> str:
        """The budget left, for the planner's prompt; empty when nothing is limited."""
        parts = []
        for kind in LEDGER_KINDS:
            limit, left = self.limits.get(kind), self.remaining(kind)
            if limit is not None and left is not None:
                parts.append(f"{amount(kind, left)} left of {amount(kind, limit)}")
        return "; ".join(parts)

    # --- transitions (pure; the adapter saves them with compare-and-set) -----------

    def expire(self, now: float) -> None:
        self.reservations = {k: r for k, r in self.reservations.items() if r.expires_at > now}

    def try_reserve(
        self, rid: str, want: Spend, step_id: str, now: float, ttl_s: float
    ) -> Decision:
        self.expire(now)
        if self.status is LedgerStatus.CLOSED:
            return Decision(Verdict.CLOSED, reason=self.closed_reason or "the task has ended")
        if self.status is LedgerStatus.PAUSED:
            return Decision(Verdict.PAUSED, reason=self.exhausted.reason if self.exhausted else "")
        if rid in self.reservations:
            return Decision(Verdict.GRANTED)
        for kind in LEDGER_KINDS:
            limit = self.limits.get(kind)
            need = want.get(kind)
            if limit is None or need <= 0:
                continue
            used = self.spent.get(kind)
            if used + need > limit:
                self._exhaust(kind, used, limit, need, step_id)
                return Decision(Verdict.EXHAUSTED, reason=self.exhausted.reason, flipped=True)  # type: ignore[union-attr]
            if used + self.reserved.get(kind) + need > limit:
                return Decision(Verdict.WAIT)
        self.reservations[rid] = Reservation(amount=want, step_id=step_id, expires_at=now + ttl_s)
        return Decision(Verdict.GRANTED)

    def _exhaust(
        self, kind: BudgetKind, used: float, limit: float, need: float, step_id: str
    ) -> None:
        what = f"for step {step_id}" if step_id else "for the planner"
        reason = (
            f"{kind.value} budget exhausted: {amount(kind, used)} spent of "
            f"{amount(kind, limit)}, and the next call {what} could need up to "
            f"{amount(kind, need)}"
        )
        self.exhausted = Exhaustion(
            kind=kind, used=used, limit=limit, needed=need, step_id=step_id, reason=reason
        )
        self.status = LedgerStatus.PAUSED

    def pause(self, kind: BudgetKind, used: float, limit: float, reason: str) -> bool:
        """Pause from outside a reservation (the wall-clock limit). True if it paused now."""
        if self.status is not LedgerStatus.OPEN:
            return False
        self.exhausted = Exhaustion(kind=kind, used=used, limit=limit, needed=0, reason=reason)
        self.status = LedgerStatus.PAUSED
        return True

    def settle(self, rid: str, actual: Spend) -> list[BudgetFigure]:
        """Replace the reservation by what was really spent; returns budgets that just
        crossed the warning threshold."""
        if rid in self.settled:
            return []
        self.reservations.pop(rid, None)
        self.spent = self.spent + actual
        self.settled = [*self.settled[-(_SETTLED_KEEP - 1) :], rid]
        crossed = []
        for kind in LEDGER_KINDS:
            fig = self.figure(kind)
            if fig and kind not in self.warned and fig.used >= WARN_AT * fig.limit:
                self.warned.append(kind)
                crossed.append(fig)
        return crossed

    def release(self, rid: str) -> None:
        self.reservations.pop(rid, None)

    def approve(self, approval_id: str, add: Spend) -> bool:
        """Apply an approval once: more budget, and a paused ledger opens again."""
        if approval_id in self.approvals or self.status is LedgerStatus.CLOSED:
            return False
        self.approvals = [*self.approvals, approval_id]
        self.limits = self.limits.extended(add)
        self.round += 1
        self.warned = []
        if self.status is LedgerStatus.PAUSED:
            self.status = LedgerStatus.OPEN
            self.exhausted = None
        return True

    def close(self, reason: str) -> None:
        self.status = LedgerStatus.CLOSED
        self.closed_reason = reason
        self.reservations = {}

    # --- events ----------------------------------------------------------------------

    def exhausted_event(self, now: datetime) -> BudgetExhausted:
        ex = self.exhausted
        if ex is None:  # pragma: no cover - called right after a pause
            raise RuntimeError("the ledger is not exhausted")
        deadline = (
            now + timedelta(seconds=self.approval_timeout_s)
            if self.policy is OnBudget.PAUSE
            else None
        )
        hint = approve_hint(self.task_id, ex.kind)
        action = (
            f"{_WAITING_FOR_APPROVAL}{hint}"
            if self.policy is OnBudget.PAUSE
            else f"; raise the budget ({ex.kind.value}) and run the task again"
        )
        return BudgetExhausted(
            event_id=derived_event_id(self.task_id, "budget-exhausted", self.round),
            task_id=self.task_id,
            figure=BudgetFigure(kind=ex.kind, used=ex.used, limit=max(ex.limit, 1e-12)),
            needed=ex.needed,
            reason=ex.reason + action,
            cause=ex.reason,
            action=self.policy,
            approval_deadline=deadline,
            step_id=ex.step_id,
            round=self.round,
        )

    def warning_event(self, fig: BudgetFigure) -> BudgetWarning:
        return BudgetWarning(
            event_id=derived_event_id(self.task_id, "budget-warning", fig.kind, self.round),
            task_id=self.task_id,
            figure=fig,
            threshold=WARN_AT,
        )


class Verdict(StrEnum):
    GRANTED = "granted"
    WAIT = "wait"  # fits once other reservations settle
    EXHAUSTED = "exhausted"  # cannot fit: the ledger paused
    PAUSED = "paused"  # already paused by someone else
    CLOSED = "closed"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    flipped: bool = False  # this decision paused the ledger


@dataclass
class Hold:
    """A granted reservation; the holder sets ``actual`` to what was really spent."""

    want: Spend
    actual: Spend = field(default_factory=Spend)


# --- the shared ledger ---------------------------------------------------------------


class BudgetLedger:
    """The ledgers of all tasks in a JetStream KV bucket."""

    def __init__(self, store: CasStore[Ledger]) -> None:
        self.store = store

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.BUDGET_LEDGER_BUCKET
    ) -> BudgetLedger:
        return cls(CasStore(await open_bucket(js, bucket), Ledger))

    async def load(self, task_id: str) -> Ledger | None:
        found = await self.store.load(task_id)
        return found[0] if found else None

    async def create(self, ledger: Ledger) -> Ledger:
        """Create the task's ledger unless it exists; returns the stored one."""
        stored = await self.store.mutate(ledger.task_id, lambda cur: None if cur else ledger)
        return stored or ledger

    async def reserve(
        self, task_id: str, rid: str, want: Spend, *, step_id: str = "", ttl_s: float
    ) -> tuple[Decision, Ledger | None]:
        """Reserve ``want`` for ``rid``. While other callers' reservations hold the budget
        it waits for them to settle; that wait is bounded, since a reservation lapses
        after ``ttl_s``. A task with no ledger is not budgeted: granted."""
        holder: list[Decision] = []

        def change(current: Ledger | None) -> Ledger | None:
            holder.clear()
            if current is None:
                holder.append(Decision(Verdict.GRANTED))
                return None
            holder.append(current.try_reserve(rid, want, step_id, time.time(), ttl_s))
            granted = holder[0].verdict is Verdict.GRANTED
            return current if granted or holder[0].flipped else None

        pause = 0.02
        while True:
            ledger = await self.store.mutate(task_id, change)
            if holder[0].verdict is not Verdict.WAIT:
                return holder[0], ledger
            await asyncio.sleep(pause)
            pause = min(0.25, pause * 2)

    @contextlib.asynccontextmanager
    async def hold(
        self,
        task_id: str,
        want: Spend,
        *,
        publish: Publish,
        step_id: str = "",
        ttl_s: float,
    ) -> AsyncIterator[Hold]:
        """Reserve ``want`` for the block; settle to ``hold.actual`` when it ends, or give
        the reservation back if it raises. Raises :class:`BudgetRefused` (after
        publishing ``BudgetExhausted`` if this call paused the task) when refused, and
        publishes ``BudgetWarning`` for budgets the spend pushes past 80%."""
        rid = new_id("rsv")
        decision, ledger = await self.reserve(task_id, rid, want, step_id=step_id, ttl_s=ttl_s)
        if decision.verdict is not Verdict.GRANTED:
            if decision.flipped and ledger is not None:
                await publish(ledger.exhausted_event(utcnow()))
            raise BudgetRefused(decision.reason, closed=decision.verdict is Verdict.CLOSED)
        hold = Hold(want)
        try:
            yield hold
        except BaseException:
            await asyncio.shield(self.release(task_id, rid))
            raise
        crossed, ledger = await self.settle(task_id, rid, hold.actual)
        if ledger is not None:
            for figure in crossed:
                await publish(ledger.warning_event(figure))

    async def settle(
        self, task_id: str, rid: str, actual: Spend
    ) -> tuple[list[BudgetFigure], Ledger | None]:
        crossed: list[BudgetFigure] = []

        def change(current: Ledger | None) -> Ledger | None:
            crossed.clear()
            if current is None:
                return None
            crossed.extend(current.settle(rid, actual))
            return current

        ledger = await self.store.mutate(task_id, change)
        return crossed, ledger

    async def release(self, task_id: str, rid: str) -> None:
        def change(current: Ledger | None) -> Ledger | None:
            if current is None or rid not in current.reservations:
                return None
            current.release(rid)
            return current

        await self.store.mutate(task_id, change)

    async def approve(self, task_id: str, approval_id: str, add: Spend) -> Ledger | None:
        def change(current: Ledger | None) -> Ledger | None:
            return current if current is not None and current.approve(approval_id, add) else None

        return await self.store.mutate(task_id, change)

    async def pause(
        self, task_id: str, kind: BudgetKind, used: float, limit: float, reason: str
    ) -> tuple[bool, Ledger | None]:
        flipped: list[bool] = []

        def change(current: Ledger | None) -> Ledger | None:
            flipped.clear()
            flipped.append(current is not None and current.pause(kind, used, limit, reason))
            return current if flipped[0] else None

        ledger = await self.store.mutate(task_id, change)
        return bool(flipped and flipped[0]), ledger

    async def close(self, task_id: str, reason: str) -> None:
        def change(current: Ledger | None) -> Ledger | None:
            if current is None or current.status is LedgerStatus.CLOSED:
                return None
            current.close(reason)
            return current

        await self.store.mutate(task_id, change)
