"""Value objects shared by events and request/reply messages."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

StepId = Annotated[
    str,
    Field(pattern=r"^[A-Za-z0-9_-]{1,32}$", description="Step id, unique within a plan."),
]


def new_id(prefix: str) -> str:
    """A fresh, subject-safe identifier such as ``tsk_3f2a...``."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


_DERIVED_NS = uuid.UUID("6f1d3c1e-8a52-4f0e-9a1c-2b7d0c5e4a10")


def derived_event_id(task_id: str, *parts: object) -> str:
    """A deterministic event id: the same inputs give the same id, so an event that is
    published again after a crash is dropped by JetStream's de-duplication."""
    key = "/".join([task_id, *map(str, parts)])
    return f"evt_{uuid.uuid5(_DERIVED_NS, key).hex[:20]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def describe_validation(exc: ValidationError, *, limit: int = 5, root: str = "<root>") -> str:
    """A validation error in one line a person (or a model) can act on: how many
    problems, then each field's dotted path and what is wrong, at most ``limit``."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or root}: {err['msg']}"
        for err in exc.errors()[:limit]
    )
    return f"{exc.error_count()} problem(s): {problems}"


class Contract(BaseModel):
    """Base of every message: unknown fields are ignored so old readers accept new writers."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class BudgetAddition(Contract):
    """More budget for a task: what an approval adds to each limit."""

    add_cost_usd: float = Field(0, ge=0, description="US dollars added to the cost budget.")
    add_tokens: int = Field(0, ge=0, description="Tokens added to the token budget.")
    add_llm_calls: int = Field(0, ge=0, description="LLM calls added.")
    add_sandbox_cpu_seconds: float = Field(0, ge=0, description="Sandbox CPU-seconds added.")
    add_wall_seconds: float = Field(0, ge=0, description="Seconds added to the time limit.")


class ModelUsage(Contract):
    prompt_tokens: int = Field(0, ge=0, description="Input tokens billed.")
    completion_tokens: int = Field(0, ge=0, description="Output tokens billed.")
    cached_tokens: int = Field(0, ge=0, description="Input tokens served from the provider cache.")
    calls: int = Field(0, ge=0, description="Number of LLM calls.")
    cost_usd: float = Field(0.0, ge=0, description="Cost in US dollars from the price table.")

    def __add__(self, other: ModelUsage) -> ModelUsage:
        return ModelUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            calls=self.calls + other.calls,
            cost_usd=self.cost_usd + other.cost_usd,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Usage(Contract):
    """LLM spend: totals plus the same figures per model."""

    by_model: dict[str, ModelUsage] = Field(
        default_factory=dict, description="Usage per model name."
    )

    @property
    def total(self) -> ModelUsage:
        out = ModelUsage()
        for part in self.by_model.values():
            out = out + part
        return out

    def __add__(self, other: Usage) -> Usage:
        merged = dict(self.by_model)
        for model, part in other.by_model.items():
            merged[model] = merged[model] + part if model in merged else part
        return Usage(by_model=merged)

    @classmethod
    def of(cls, model: str, part: ModelUsage) -> Usage:
        return cls(by_model={model: part})


class OnBudget(StrEnum):
    """What a task does when one of its budgets runs out."""

    PAUSE = "pause"  # wait for approval (agentbus approve), fail after the approval timeout
    FAIL = "fail"  # fail at once with the reason


class BudgetKind(StrEnum):
    """The kinds of budget a task has; used in warnings, refusals and approvals."""

    COST = "cost"
    TOKENS = "tokens"
    LLM_CALLS = "llm_calls"
    SANDBOX_CPU = "sandbox_cpu"
    TIME = "time"


class Budget(Contract):
    """Limits of one task. For the optional limits ``None`` means the platform's default
    (the planner's ``AGENTBUS_BUDGET_*`` settings), which is no limit unless configured."""

    max_steps: int = Field(12, ge=1, le=200, description="Most plan steps the task may run.")
    max_replans: int = Field(
        2, ge=0, le=20, description="Most times a failed step may lead to a new plan."
    )
    max_tokens: int | None = Field(None, ge=1, description="Most LLM tokens (in + out).")
    max_cost_usd: float | None = Field(None, gt=0, description="Most LLM spend in US dollars.")
    max_wall_seconds: float = Field(
        1800,
        gt=0,
        description="Wall-clock limit from submission to the end of the task; time spent "
        "waiting for approval does not count.",
    )
    max_llm_calls: int | None = Field(None, ge=1, description="Most LLM calls.")
    max_sandbox_cpu_seconds: float | None = Field(
        None, gt=0, description="Most CPU-seconds the task's code may use in the sandbox."
    )
    on_exhausted: OnBudget | None = Field(
        None, description="pause (wait for approval) or fail when a budget runs out."
    )
    approval_timeout_s: float | None = Field(
        None, gt=0, description="How long a paused task waits for approval before failing."
    )


class PlanStep(Contract):
    id: StepId
    title: str = Field(min_length=1, max_length=200, description="Short name of the step.")
    instructions: str = Field(
        min_length=1, max_length=8000, description="What the executor must do in this step."
    )
    depends_on: list[StepId] = Field(
        default_factory=list, description="Ids of steps whose output this step needs."
    )
    expected_output: str = Field(
        "", max_length=2000, description="What the step must produce (files, values)."
    )


class Plan(Contract):
    """A plan: a small DAG of steps. Validation rejects unknown deps and cycles."""

    steps: list[PlanStep] = Field(min_length=1, max_length=200, description="Steps of the plan.")

    @model_validator(mode="after")
    def _check_dag(self) -> Self:
        ids = [s.id for s in self.steps]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate step ids: {', '.join(dupes)}")
        known = set(ids)
        for step in self.steps:
            missing = [d for d in step.depends_on if d not in known]
            if missing:
                raise ValueError(f"step {step.id} depends on unknown steps: {', '.join(missing)}")
        graph = {s.id: set(s.depends_on) for s in self.steps}
        done: set[str] = set()
        while graph:
            ready = [i for i, deps in graph.items() if deps <= done]
            if not ready:
                raise ValueError(f"dependency cycle among steps: {', '.join(sorted(graph))}")
            for i in ready:
                done.add(i)
                del graph[i]
        return self
