"""The budget ledger's rules: reserve the worst case before spending, settle to the truth.

Pure: a :class:`Ledger` is the stored record (``agentbus.contracts.LedgerRecord``) with
the transitions below; ``adapters`` keeps the records in their KV bucket, changed with
compare-and-set, so concurrent steps of one task can never spend past its budget together.

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

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from agentbus.contracts import (
    LEDGER_KINDS,
    BudgetExhausted,
    BudgetFigure,
    BudgetKind,
    BudgetWarning,
    Event,
    Exhaustion,
    LedgerRecord,
    LedgerStatus,
    OnBudget,
    Reservation,
    Spend,
    derived_event_id,
)

Publish = Callable[[Event], Awaitable[object]]


class BudgetRefused(Exception):
    """The call or run was not made: the task's budget could be crossed (the task pauses
    for approval or fails), or the task has ended (``closed``: cancelled or finished)."""

    def __init__(self, message: str, *, closed: bool = False) -> None:
        super().__init__(message)
        self.closed = closed


WARN_AT = 0.8
# Joins a BudgetExhausted reason (what ran out) to how to approve more.
_WAITING_FOR_APPROVAL = "; waiting for approval: "
_SETTLED_KEEP = 200


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


class Ledger(LedgerRecord):
    """A task's ledger record (``contracts.LedgerRecord``, as stored) with its rules."""

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
