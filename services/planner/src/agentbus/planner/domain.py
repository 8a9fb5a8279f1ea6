"""The planner's logic, free of I/O: task state, transitions and prompts.

A transition takes the state and an input and returns the new state; the events it
must publish are appended to ``state.outbox`` with deterministic ids. The handler saves
the state (compare-and-set) and only then publishes the outbox, so a crash between the
two is repaired by redelivery: the event is found applied, the outbox is published again,
and JetStream drops the duplicates by id.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from agentbus.contracts import (
    Budget,
    Event,
    Plan,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepReady,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    Usage,
    derived_event_id,
    parse_event,
    utcnow,
)

_APPLIED_KEEP = 500


class TaskPhase(StrEnum):
    RUNNING = "running"
    FINISHING = "finishing"  # every step done; the answer is being written
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {TaskPhase.COMPLETED, TaskPhase.FAILED, TaskPhase.CANCELLED}


class StepStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    FAILED = "failed"


class StepState(BaseModel):
    step: PlanStep
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    output: str = ""
    error: str = ""


class TaskState(BaseModel):
    task_id: str
    goal: str
    budget: Budget
    submitted_at: datetime
    phase: TaskPhase = TaskPhase.RUNNING
    revision: int = 0
    steps: dict[str, StepState] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    workspace_files: list[str] = Field(default_factory=list)
    answer: str = ""
    reason: str = ""
    applied: list[str] = Field(default_factory=list, description="Ids of events applied.")
    outbox: list[dict[str, Any]] = Field(default_factory=list, description="Events to publish.")

    # --- queries -------------------------------------------------------------------

    def was_applied(self, event: Event) -> bool:
        return event.event_id in self.applied

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL

    def ready_steps(self) -> list[StepState]:
        done = {i for i, s in self.steps.items() if s.status is StepStatus.COMPLETED}
        return [
            s
            for s in self.steps.values()
            if s.status is StepStatus.PENDING and set(s.step.depends_on) <= done
        ]

    def all_done(self) -> bool:
        return bool(self.steps) and all(
            s.status is StepStatus.COMPLETED for s in self.steps.values()
        )

    def pending_events(self) -> list[Event]:
        return [parse_event(raw) for raw in self.outbox]

    def budget_problem(self, now: datetime) -> str | None:
        total = self.usage.total
        b = self.budget
        if b.max_tokens is not None and total.total_tokens > b.max_tokens:
            return f"token budget exceeded: used {total.total_tokens} of {b.max_tokens} tokens"
        if b.max_cost_usd is not None and total.cost_usd > b.max_cost_usd:
            return f"cost budget exceeded: spent ${total.cost_usd:.4f} of ${b.max_cost_usd:.4f}"
        elapsed = (now - self.submitted_at).total_seconds()
        if elapsed > b.max_wall_seconds:
            return f"time limit exceeded: {elapsed:.0f}s of {b.max_wall_seconds:.0f}s"
        return None

    # --- transitions ---------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self.outbox.append(event.model_dump(mode="json"))

    def mark_applied(self, event: Event) -> None:
        self.applied = [*self.applied[-(_APPLIED_KEEP - 1) :], event.event_id]

    def published(self, event_ids: set[str]) -> None:
        self.outbox = [raw for raw in self.outbox if raw["event_id"] not in event_ids]

    def start(self, plan: Plan, usage: Usage) -> None:
        """Record the plan and dispatch every step whose dependencies are met."""
        self.revision += 1
        self.steps = {s.id: StepState(step=s) for s in plan.steps}
        self.usage = self.usage + usage
        self._emit(
            PlanCreated(
                event_id=derived_event_id(self.task_id, "plan", self.revision),
                task_id=self.task_id,
                steps=plan.steps,
                revision=self.revision,
                usage=usage,
            )
        )
        self._dispatch_ready()

    def _dispatch_ready(self) -> None:
        for state in self.ready_steps():
            state.status = StepStatus.DISPATCHED
            state.attempt += 1
            inputs = {d: self.steps[d].output for d in state.step.depends_on}
            self._emit(
                StepReady(
                    event_id=derived_event_id(self.task_id, "ready", state.step.id, state.attempt),
                    task_id=self.task_id,
                    step=state.step,
                    goal=self.goal,
                    inputs=inputs,
                    attempt=state.attempt,
                )
            )

    def step_completed(self, event: StepCompleted, now: datetime) -> None:
        state = self.steps.get(event.step_id)
        if self.terminal or state is None or state.status is StepStatus.COMPLETED:
            return
        state.status = StepStatus.COMPLETED
        state.output = event.output
        self.usage = self.usage + event.usage
        if event.workspace_files:
            self.workspace_files = sorted(set(self.workspace_files) | set(event.workspace_files))
        problem = self.budget_problem(now)
        if problem:
            self.fail(problem)
        elif self.all_done():
            self.phase = TaskPhase.FINISHING
        else:
            self._dispatch_ready()

    def step_failed(self, event: StepFailed) -> None:
        state = self.steps.get(event.step_id)
        if self.terminal or state is None or state.status is StepStatus.COMPLETED:
            return
        state.status = StepStatus.FAILED
        state.error = event.error
        self.usage = self.usage + event.usage
        self.fail(f"step {event.step_id} ({state.step.title}) failed: {event.error}")

    def complete(self, answer: str, usage: Usage) -> None:
        if self.terminal:
            return
        self.phase = TaskPhase.COMPLETED
        self.usage = self.usage + usage
        self.answer = answer
        self._emit(
            TaskCompleted(
                event_id=derived_event_id(self.task_id, "completed"),
                task_id=self.task_id,
                answer=answer,
                artifacts=self.workspace_files,
                usage=self.usage,
            )
        )

    def fail(self, reason: str, usage: Usage | None = None) -> None:
        if self.terminal:
            return
        self.phase = TaskPhase.FAILED
        self.usage = self.usage + (usage or Usage())
        self.reason = reason
        self._emit(
            TaskFailed(
                event_id=derived_event_id(self.task_id, "failed"),
                task_id=self.task_id,
                reason=reason,
                usage=self.usage,
            )
        )

    def cancel(self, reason: str) -> None:
        if self.terminal:
            return
        self.phase = TaskPhase.CANCELLED
        self.reason = reason
        self._emit(
            TaskCancelled(
                event_id=derived_event_id(self.task_id, "cancelled"),
                task_id=self.task_id,
                reason=reason,
                usage=self.usage,
            )
        )


def new_state(event: TaskSubmitted) -> TaskState:
    return TaskState(
        task_id=event.task_id, goal=event.goal, budget=event.budget, submitted_at=event.occurred_at
    )


def failed_before_planning(event: TaskSubmitted, reason: str, usage: Usage) -> TaskState:
    state = new_state(event)
    state.fail(reason, usage)
    return state


# --- prompts -----------------------------------------------------------------------

PLAN_SYSTEM = """You are the planner of agentbus, a platform where agents carry out tasks.
Break the user's task into a short plan of steps. Each step is carried out by an executor
agent that can run Python 3 and shell commands in a sandbox (no network) and read and write
files in the task's workspace directory, which all steps share.

Reply with JSON only, no prose, in exactly this shape:
{"steps": [{"id": "s1", "title": "short name", "instructions": "what to do, precisely",
            "depends_on": [], "expected_output": "what the step must produce"}]}

Rules: ids are short (s1, s2, ...); use as few steps as the task needs, at most {max_steps};
steps with no dependencies run in parallel; a step sees the outputs of the steps it depends on.
"""

ANSWER_SYSTEM = """You are the planner of agentbus. The steps of the user's task are done.
Write the final answer for the user from the step results: state the result plainly,
name the files produced, and keep it short."""


def plan_messages(goal: str, budget: Budget) -> list[tuple[str, str]]:
    return [
        ("system", PLAN_SYSTEM.replace("{max_steps}", str(budget.max_steps))),
        ("user", f"Task: {goal}"),
    ]


def repair_message(error: str) -> str:
    return (
        f"That plan is not valid: {error}\n"
        "Reply again with the corrected plan, as JSON only, in the same shape."
    )


def answer_messages(state: TaskState) -> list[tuple[str, str]]:
    lines = [f"Task: {state.goal}", "", "Step results:"]
    lines += [f"[{s.step.id}] {s.step.title}: {s.output}" for s in state.steps.values()]
    if state.workspace_files:
        lines += ["", "Files in the workspace: " + ", ".join(state.workspace_files)]
    return [("system", ANSWER_SYSTEM), ("user", "\n".join(lines))]


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.MULTILINE)


class PlanError(ValueError):
    """The LLM's plan could not be used; the message says why."""


def parse_plan(text: str | None, budget: Budget) -> Plan:
    """Parse and validate a plan from the LLM's reply text."""
    if not text or not text.strip():
        raise PlanError("the reply was empty; expected a JSON object with a 'steps' list")
    body = _FENCE.sub("", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise PlanError(f"no JSON object in the reply: {text[:200]!r}")
    try:
        data = json.loads(body[start : end + 1])
    except json.JSONDecodeError as exc:
        raise PlanError(f"the reply is not valid JSON ({exc.msg} at char {exc.pos})") from exc
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise PlanError(f"the plan does not match the schema: {problems}") from exc
    if len(plan.steps) > budget.max_steps:
        raise PlanError(
            f"the plan has {len(plan.steps)} steps; this task allows at most {budget.max_steps}"
        )
    return plan


def now() -> datetime:
    return utcnow()
