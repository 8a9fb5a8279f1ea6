"""Lifecycle events. One model per event type, one subject per event type.

Rules (see STYLE.md): every field is described; fields are added, never changed
or removed; ``schema_version`` is bumped when a field is added.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, TypeAdapter

from .models import (
    Budget,
    BudgetAddition,
    BudgetKind,
    Contract,
    ModelUsage,
    OnBudget,
    PlanStep,
    StepId,
    Usage,
    new_id,
    utcnow,
)
from .subjects import event_subject

SCHEMA_VERSION = 1


class Event(Contract):
    """Fields every event carries."""

    event_type: ClassVar[str]

    schema_version: int = Field(SCHEMA_VERSION, description="Version of this event's schema.")
    event_id: str = Field(
        default_factory=lambda: new_id("evt"),
        description="Unique id; published as Nats-Msg-Id so JetStream drops duplicates.",
    )
    task_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The task this is about.")
    occurred_at: datetime = Field(default_factory=utcnow, description="When it happened (UTC).")

    @property
    def subject(self) -> str:
        return event_subject(self.task_id, self.event_type)


class TaskSubmitted(Event):
    event_type: ClassVar[str] = "task.submitted"
    type: Literal["task.submitted"] = "task.submitted"
    goal: str = Field(min_length=1, max_length=20_000, description="The task in plain words.")
    budget: Budget = Field(default_factory=Budget, description="Limits of the task.")
    submitted_by: str = Field("cli", max_length=200, description="Who submitted the task.")
    tenant: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="The tenant the task belongs to, set by the gateway from the caller's "
        "API key; empty for tasks submitted on the bus directly (the CLI, local use).",
    )


class PlanCreated(Event):
    event_type: ClassVar[str] = "task.plan_created"
    type: Literal["task.plan_created"] = "task.plan_created"
    steps: list[PlanStep] = Field(description="The validated plan.")
    revision: int = Field(1, ge=1, description="1 for the first plan, +1 per re-plan.")
    usage: Usage = Field(default_factory=Usage, description="LLM spend of planning.")


class StepReady(Event):
    event_type: ClassVar[str] = "step.ready"
    type: Literal["step.ready"] = "step.ready"
    step: PlanStep = Field(description="The step to run.")
    goal: str = Field(description="The task's goal, for context.")
    inputs: dict[str, str] = Field(
        default_factory=dict, description="Outputs of the steps this one depends on, by step id."
    )
    attempt: int = Field(1, ge=1, description="1 for the first dispatch of this step.")


class ToolOutcome(StrEnum):
    OK = "ok"
    ERROR = "error"


class StepToolCalled(Event):
    """Progress: the executor ran one tool. Short excerpts only, for people following along."""

    event_type: ClassVar[str] = "step.tool_called"
    type: Literal["step.tool_called"] = "step.tool_called"
    step_id: StepId
    tool: str = Field(description="Tool name, e.g. run_python.")
    summary: str = Field("", max_length=2000, description="Short excerpt of the arguments.")
    output: str = Field("", max_length=2000, description="Short excerpt of the result.")
    outcome: ToolOutcome = Field(ToolOutcome.OK, description="Whether the tool call succeeded.")
    duration_ms: float = Field(0, ge=0, description="How long the tool took.")


class StepOutcome(Event):
    """Fields every outcome of a step's attempt carries (completed, failed, paused)."""

    step_id: StepId
    usage: Usage = Field(default_factory=Usage, description="LLM spend of this attempt.")
    worker: str = Field("", description="The executor replica that ran the step.")
    attempt: int = Field(1, ge=1, description="Which dispatch of the step this answers.")


class StepCompleted(StepOutcome):
    event_type: ClassVar[str] = "step.completed"
    type: Literal["step.completed"] = "step.completed"
    output: str = Field(max_length=20_000, description="What the step produced, in words.")
    workspace_files: list[str] = Field(
        default_factory=list, description="Files in the task's workspace after the step."
    )


class StepFailed(StepOutcome):
    event_type: ClassVar[str] = "step.failed"
    type: Literal["step.failed"] = "step.failed"
    error: str = Field(max_length=20_000, description="Why the step failed, for a person.")


class TaskCompleted(Event):
    event_type: ClassVar[str] = "task.completed"
    type: Literal["task.completed"] = "task.completed"
    answer: str = Field(description="The final answer.")
    artifacts: list[str] = Field(default_factory=list, description="Files in the workspace.")
    usage: Usage = Field(default_factory=Usage, description="Total LLM spend of the task.")


class TaskFailed(Event):
    event_type: ClassVar[str] = "task.failed"
    type: Literal["task.failed"] = "task.failed"
    reason: str = Field(description="Why the task failed, in words a person can act on.")
    usage: Usage = Field(default_factory=Usage, description="Total LLM spend of the task.")


class TaskCancelRequested(Event):
    event_type: ClassVar[str] = "task.cancel_requested"
    type: Literal["task.cancel_requested"] = "task.cancel_requested"
    reason: str = Field("cancelled by user", description="Why the task should stop.")


class TaskCancelled(Event):
    event_type: ClassVar[str] = "task.cancelled"
    type: Literal["task.cancelled"] = "task.cancelled"
    reason: str = Field(description="Why the task stopped.")
    usage: Usage = Field(default_factory=Usage, description="Total LLM spend of the task.")


class StepPaused(StepOutcome):
    """The step stopped because the task's budget ran out (or the task was paused); its
    conversation is checkpointed, and it resumes where it stopped after approval."""

    event_type: ClassVar[str] = "step.paused"
    type: Literal["step.paused"] = "step.paused"
    reason: str = Field(description="Why the step stopped.")


class LLMCalled(Event):
    """One LLM call and what it cost, attributed to its task and step."""

    event_type: ClassVar[str] = "llm.called"
    type: Literal["llm.called"] = "llm.called"
    role: str = Field(description="planner or executor.")
    step_id: str = Field("", description="The step the call was for; empty for planning.")
    conversation: str = Field("", description="The dialogue the call belongs to.")
    model: str = Field(description="The model that answered.")
    usage: ModelUsage = Field(description="Tokens and cost of this call.")
    reserved_tokens: int = Field(0, ge=0, description="Worst case reserved before the call.")
    reserved_cost_usd: float = Field(0, ge=0, description="Worst-case cost reserved.")
    duration_ms: float = Field(0, ge=0, description="How long the call took.")


class BudgetFigure(Contract):
    kind: BudgetKind = Field(description="Which budget.")
    used: float = Field(ge=0, description="Spent so far.")
    limit: float = Field(gt=0, description="The budget.")


class BudgetWarning(Event):
    """A budget of the task is 80% (or more) spent."""

    event_type: ClassVar[str] = "budget.warning"
    type: Literal["budget.warning"] = "budget.warning"
    figure: BudgetFigure = Field(description="The budget crossed and how much is spent.")
    threshold: float = Field(0.8, description="The fraction that was crossed.")


class BudgetExhausted(Event):
    """A call or step was refused because it could cross a budget; the task pauses for
    approval or fails, as ``action`` says."""

    event_type: ClassVar[str] = "budget.exhausted"
    type: Literal["budget.exhausted"] = "budget.exhausted"
    figure: BudgetFigure = Field(description="The budget that ran out.")
    needed: float = Field(0, ge=0, description="What the refused call could have spent.")
    reason: str = Field(description="What ran out, in words a person can act on.")
    cause: str = Field(
        "",
        description="What ran out, without how to go on (``reason`` adds that): the part "
        "a task's final error quotes if no approval comes. Empty in events from before "
        "this field.",
    )
    action: OnBudget = Field(description="pause (await approval) or fail.")
    approval_deadline: datetime | None = Field(
        None, description="When a paused task fails unless approved."
    )
    step_id: str = Field("", description="The step whose call was refused, if any.")
    round: int = Field(0, ge=0, description="How many approvals the task had before this.")


class TaskApproved(Event, BudgetAddition):
    """A person (or any client) lets a paused task go on, with more budget."""

    event_type: ClassVar[str] = "task.approved"
    type: Literal["task.approved"] = "task.approved"
    approved_by: str = Field("cli", max_length=200, description="Who approved.")


class TaskPaused(Event):
    """The planner paused the task: a budget ran out and it awaits approval. The
    planner's decision, after ``BudgetExhausted`` (which says what ran out)."""

    event_type: ClassVar[str] = "task.paused"
    type: Literal["task.paused"] = "task.paused"
    reason: str = Field(description="What ran out.")
    approval_deadline: datetime | None = Field(
        None, description="When the task fails unless approved."
    )
    round: int = Field(0, ge=0, description="How many approvals the task had before this.")


class TaskResumed(Event):
    """An approval answered the task's pause: it goes on where it stopped."""

    event_type: ClassVar[str] = "task.resumed"
    type: Literal["task.resumed"] = "task.resumed"
    round: int = Field(0, ge=0, description="The round of the pause this answers.")


AnyEvent = Annotated[
    TaskSubmitted
    | PlanCreated
    | StepReady
    | StepToolCalled
    | StepCompleted
    | StepFailed
    | StepPaused
    | LLMCalled
    | BudgetWarning
    | BudgetExhausted
    | TaskApproved
    | TaskPaused
    | TaskResumed
    | TaskCompleted
    | TaskFailed
    | TaskCancelRequested
    | TaskCancelled,
    Field(discriminator="type"),
]

EVENT_TYPES: dict[str, type[Event]] = {
    cls.event_type: cls
    for cls in (
        TaskSubmitted,
        PlanCreated,
        StepReady,
        StepToolCalled,
        StepCompleted,
        StepFailed,
        StepPaused,
        LLMCalled,
        BudgetWarning,
        BudgetExhausted,
        TaskApproved,
        TaskPaused,
        TaskResumed,
        TaskCompleted,
        TaskFailed,
        TaskCancelRequested,
        TaskCancelled,
    )
}
TERMINAL_EVENT_TYPES = frozenset(
    {TaskCompleted.event_type, TaskFailed.event_type, TaskCancelled.event_type}
)

_ANY_EVENT: TypeAdapter[Any] = TypeAdapter(AnyEvent)


def parse_event(data: bytes | str | dict[str, Any]) -> Event:
    """Parse any lifecycle event by its ``type``; raises pydantic.ValidationError."""
    event: Event
    if isinstance(data, dict):
        event = _ANY_EVENT.validate_python(data)
    else:
        event = _ANY_EVENT.validate_json(data)
    return event
