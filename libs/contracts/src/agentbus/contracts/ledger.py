"""The budget ledger's record: a contract between the planner and the executors.

One record per task, keyed by task id, in the JetStream KV bucket
``subjects.BUDGET_LEDGER_BUCKET`` (``agentbus_budgets``), changed only with
compare-and-set. The planner creates it when a task is submitted, pauses it when the
time budget runs out, adds to it on approval and closes it when the task ends; every
LLM call and sandbox run of the task (planner and executors alike) reserves from it
first and settles to the real spend afterwards. The rules that change it live in
``agentbus.core.budget``; this module is the shape every replica reads and writes.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from .models import Budget, BudgetKind, OnBudget

_FIELD = {
    BudgetKind.COST: "cost_usd",
    BudgetKind.TOKENS: "tokens",
    BudgetKind.LLM_CALLS: "llm_calls",
    BudgetKind.SANDBOX_CPU: "sandbox_cpu",
}
LEDGER_KINDS = tuple(_FIELD)  # the kinds the ledger counts (wall time is the planner's)


class LedgerStatus(StrEnum):
    OPEN = "open"
    PAUSED = "paused"  # a budget ran out; every reservation is refused until approved
    CLOSED = "closed"  # the task was cancelled or has finished; refused for good


class Spend(BaseModel):
    """Amounts of each budgeted kind (wall time is the planner's, not the ledger's)."""

    cost_usd: float = Field(0.0, description="US dollars.")
    tokens: int = Field(0, description="Prompt plus output tokens.")
    llm_calls: int = Field(0, description="LLM calls.")
    sandbox_cpu: float = Field(0.0, description="Sandbox CPU-seconds.")

    def get(self, kind: BudgetKind) -> float:
        return float(getattr(self, _FIELD[kind]))

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            cost_usd=self.cost_usd + other.cost_usd,
            tokens=self.tokens + other.tokens,
            llm_calls=self.llm_calls + other.llm_calls,
            sandbox_cpu=self.sandbox_cpu + other.sandbox_cpu,
        )


class Limits(BaseModel):
    """The ledger's limits; None is no limit."""

    cost_usd: float | None = Field(None, description="US dollars.")
    tokens: int | None = Field(None, description="Prompt plus output tokens.")
    llm_calls: int | None = Field(None, description="LLM calls.")
    sandbox_cpu: float | None = Field(None, description="Sandbox CPU-seconds.")

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
    amount: Spend = Field(description="The worst case held back for one call or run.")
    step_id: str = Field("", description="The step that holds it; empty for the planner.")
    expires_at: float = Field(description="Epoch seconds; a crashed caller's hold lapses then.")


class Exhaustion(BaseModel):
    """Why the ledger paused: the structured reason the planner acts on."""

    kind: BudgetKind = Field(description="The budget that ran out.")
    used: float = Field(description="Spent of it when it ran out.")
    limit: float = Field(description="Its limit.")
    needed: float = Field(description="What the refused call or run could have needed.")
    step_id: str = Field("", description="The step whose call was refused, if any.")
    reason: str = Field(description="The same in words, for people.")


class LedgerRecord(BaseModel):
    """One task's ledger as stored in ``agentbus_budgets``."""

    task_id: str = Field(description="The task (also the key).")
    limits: Limits = Field(description="Current limits (approvals raise them).")
    policy: OnBudget = Field(OnBudget.PAUSE, description="What a run-out budget does.")
    approval_timeout_s: float = Field(3600.0, description="Longest wait for an approval.")
    spent: Spend = Field(default_factory=Spend, description="Settled spend so far.")
    reservations: dict[str, Reservation] = Field(
        default_factory=dict, description="Held back for calls in flight, by reservation id."
    )
    status: LedgerStatus = Field(LedgerStatus.OPEN, description="Open, paused or closed.")
    exhausted: Exhaustion | None = Field(None, description="Why it paused, while paused.")
    closed_reason: str = Field("", description="Why it closed, once closed.")
    round: int = Field(0, description="Approvals applied so far.")
    approvals: list[str] = Field(default_factory=list, description="Approval event ids applied.")
    warned: list[BudgetKind] = Field(default_factory=list, description="Warned this round.")
    settled: list[str] = Field(default_factory=list, description="Recent settled reservations.")
