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
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from agentbus.contracts import (
    TERMINAL_STATUSES,
    Budget,
    BudgetExhausted,
    Event,
    OnBudget,
    Plan,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepStatus,
    TaskApproved,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
    Usage,
    derived_event_id,
    describe_validation,
    parse_event,
    utcnow,
)

_APPLIED_KEEP = 500


class StepState(BaseModel):
    step: PlanStep
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    output: str = ""
    error: str = ""

    @field_validator("status", mode="before")
    @classmethod
    def _dispatched_is_running(cls, value: object) -> object:
        # State saved before the lifecycle moved to contracts named a running step
        # "dispatched": tasks in flight across an upgrade read it as running.
        return StepStatus.RUNNING if value == "dispatched" else value


class TaskState(BaseModel):
    task_id: str
    goal: str
    budget: Budget
    submitted_at: datetime
    # The task's status (contracts' lifecycle); the planner's own state only ever holds
    # planning, running, replanning, finishing, awaiting_approval and the terminal ones.
    phase: TaskStatus = TaskStatus.PLANNING
    resume_phase: TaskStatus | None = Field(None, description="Status to resume after approval.")
    paused_at: datetime | None = None
    paused_seconds: float = Field(0, description="Time spent awaiting approval so far.")
    approval_deadline: datetime | None = None
    approvals: int = Field(0, description="Approvals applied (the ledger's round).")
    next_pause: int | None = Field(
        None,
        description="Round of a pause that came in while an earlier one still awaited its "
        "approval (the ledger ran out again once reopened): the approval of the earlier "
        "one does not resume the task.",
    )
    next_pause_deadline: datetime | None = None
    exhausted_reason: str = ""
    revision: int = 0
    steps: dict[str, StepState] = Field(default_factory=dict)
    usage: Usage = Field(default_factory=Usage)
    workspace_files: list[str] = Field(default_factory=list)
    answer: str = ""
    reason: str = ""
    replans: int = 0
    failures: list[str] = Field(default_factory=list, description="Why steps failed.")
    retired_ids: list[str] = Field(
        default_factory=list, description="Ids of steps dropped by re-planning; never reused."
    )
    applied: list[str] = Field(default_factory=list, description="Ids of events applied.")
    outbox: list[dict[str, Any]] = Field(default_factory=list, description="Events to publish.")

    # --- queries -------------------------------------------------------------------

    def was_applied(self, event: Event) -> bool:
        return event.event_id in self.applied

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_STATUSES

    def ready_steps(self) -> list[StepState]:
        done = {i for i, s in self.steps.items() if s.status is StepStatus.COMPLETED}
        return [
            s
            for s in self.steps.values()
            if s.status in {StepStatus.PENDING, StepStatus.PAUSED}
            and set(s.step.depends_on) <= done
        ]

    def all_done(self) -> bool:
        return bool(self.steps) and all(
            s.status is StepStatus.COMPLETED for s in self.steps.values()
        )

    def pending_events(self) -> list[Event]:
        return [parse_event(raw) for raw in self.outbox]

    def elapsed_s(self, now: datetime) -> float:
        """Wall-clock time the task has run; time awaiting approval does not count."""
        waiting = (now - self.paused_at).total_seconds() if self.paused_at else 0.0
        return (now - self.submitted_at).total_seconds() - self.paused_seconds - waiting

    def over_time(self, now: datetime) -> bool:
        return self.active and self.elapsed_s(now) > self.budget.max_wall_seconds

    @property
    def active(self) -> bool:
        """Working (not finished, not waiting for approval)."""
        return not self.terminal and self.phase is not TaskStatus.AWAITING_APPROVAL

    def next_deadline(self) -> datetime | None:
        """When the planner must look at the task again if nothing happens: the approval
        deadline while waiting, the end of the time budget while working."""
        if self.terminal:
            return None
        if self.phase is TaskStatus.AWAITING_APPROVAL:
            return self.approval_deadline
        return self.submitted_at + timedelta(
            seconds=self.budget.max_wall_seconds + self.paused_seconds
        )

    # --- transitions ---------------------------------------------------------------

    def _emit(self, event: Event) -> None:
        self.outbox.append(event.model_dump(mode="json"))

    def mark_applied(self, event: Event) -> None:
        self.applied = [*self.applied[-(_APPLIED_KEEP - 1) :], event.event_id]

    def published(self, event_ids: set[str]) -> None:
        self.outbox = [raw for raw in self.outbox if raw["event_id"] not in event_ids]

    def start(self, plan: Plan, usage: Usage) -> None:
        """Record the plan and dispatch every step whose dependencies are met."""
        if self.phase is not TaskStatus.PLANNING:
            return
        self.phase = TaskStatus.RUNNING
        self.steps = {s.id: StepState(step=s) for s in plan.steps}
        self._planned(usage)
        self._dispatch_ready()

    def _planned(self, usage: Usage) -> None:
        """A new revision of the plan (its steps are ``self.steps``), with what it cost."""
        self.revision += 1
        self.usage = self.usage + usage
        self._emit(
            PlanCreated(
                event_id=derived_event_id(self.task_id, "plan", self.revision),
                task_id=self.task_id,
                steps=[s.step for s in self.steps.values()],
                revision=self.revision,
                usage=usage,
            )
        )

    def _dispatch_ready(self) -> None:
        if self.phase is not TaskStatus.RUNNING:
            return
        for state in self.ready_steps():
            state.status = StepStatus.RUNNING
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

    def _step_ended(
        self, event: StepCompleted | StepFailed, status: StepStatus
    ) -> StepState | None:
        """The step an outcome ends, now ``status``, its spend counted; None when the task
        is over or the step had completed already (a late or repeated outcome)."""
        state = self.steps.get(event.step_id)
        if self.terminal or state is None or state.status is StepStatus.COMPLETED:
            return None
        state.status = status
        self.usage = self.usage + event.usage
        return state

    def step_completed(self, event: StepCompleted) -> None:
        state = self._step_ended(event, StepStatus.COMPLETED)
        if state is None:
            return
        state.output = event.output
        if event.workspace_files:
            self.workspace_files = sorted(set(self.workspace_files) | set(event.workspace_files))
        self._go_on()

    def _go_on(self) -> None:
        """Running: finish when every step is done, else dispatch what is ready. Other
        phases decide themselves what runs next (a re-plan, an approval)."""
        if self.phase is not TaskStatus.RUNNING:
            return
        if self.all_done():
            self.phase = TaskStatus.FINISHING
        else:
            self._dispatch_ready()

    def step_failed(self, event: StepFailed) -> None:
        state = self._step_ended(event, StepStatus.FAILED)
        if state is None:
            return
        state.error = event.error
        failure = f"step {event.step_id} ({state.step.title}) failed: {event.error}"
        self.failures.append(failure)
        waiting = self.phase is TaskStatus.AWAITING_APPROVAL
        if (self.resume_phase if waiting else self.phase) is TaskStatus.REPLANNING:
            return  # the re-plan under way (or to resume) will see this failure too
        if self.replans >= self.budget.max_replans:
            limit = self.budget.max_replans
            after = f" after {limit} re-plan(s)" if limit else " (re-planning is off)"
            self.fail(failure + after)
            return
        if waiting:
            self.resume_phase = TaskStatus.REPLANNING
        else:
            self.phase = TaskStatus.REPLANNING

    def step_paused(self, event: StepPaused) -> None:
        """The step stopped for lack of budget; it is dispatched again (and resumes its
        checkpointed dialogue) once the task is approved (see :meth:`resume_paused`)."""
        state = self.steps.get(event.step_id)
        if self.terminal or state is None or state.status is not StepStatus.RUNNING:
            return
        if event.attempt != state.attempt:
            return
        state.status = StepStatus.PAUSED
        self.usage = self.usage + event.usage

    def has_paused_steps(self) -> bool:
        return any(s.status is StepStatus.PAUSED for s in self.steps.values())

    def resume_paused(self) -> None:
        """The budget is open again (an approval came first): dispatch paused steps."""
        self._go_on()

    def budget_exhausted(self, event: BudgetExhausted, now: datetime) -> None:
        if self.terminal or event.round < self.approvals:
            return  # finished, or an approval already answered this exhaustion
        if event.action is OnBudget.FAIL:
            self.fail(event.reason)
            return
        self.exhausted_reason = event.cause or event.reason
        if event.round > self.approvals:
            # An approval is under way (the ledger has applied it, this state not yet)
            # and the budget ran out again after it: that approval does not answer this.
            self.next_pause = max(event.round, self.next_pause or 0)
            self.next_pause_deadline = event.approval_deadline
        if self.phase is TaskStatus.AWAITING_APPROVAL:
            return
        self.resume_phase = self.phase
        self.phase = TaskStatus.AWAITING_APPROVAL
        self.paused_at = now
        self._paused(event.approval_deadline)

    def _paused(self, deadline: datetime | None) -> None:
        self.approval_deadline = deadline
        self._emit(
            TaskPaused(
                event_id=derived_event_id(self.task_id, "paused", self.approvals),
                task_id=self.task_id,
                reason=self.exhausted_reason,
                approval_deadline=deadline,
                round=self.approvals,
            )
        )

    def approved(self, event: TaskApproved, now: datetime) -> None:
        """More budget: resume what was paused, where it stopped."""
        if self.terminal:
            return
        answered = self.approvals  # the round of the pause this approval answers
        self.approvals += 1
        if event.add_wall_seconds:
            self.budget = self.budget.model_copy(
                update={"max_wall_seconds": self.budget.max_wall_seconds + event.add_wall_seconds}
            )
        if self.phase is not TaskStatus.AWAITING_APPROVAL:
            self._go_on()  # approved before the pause reached us: paused steps go on
            return
        if self.next_pause is not None and self.next_pause >= self.approvals:
            # The ledger ran out again in this approval's round: the task answers the
            # earlier pause and waits for the next approval, with the new deadline.
            self._resumed(answered)
            self._paused(self.next_pause_deadline)
            if self.next_pause == self.approvals:
                self.next_pause = self.next_pause_deadline = None
            return
        if self.paused_at is not None:
            self.paused_seconds += max(0.0, (now - self.paused_at).total_seconds())
        self.phase = self.resume_phase or TaskStatus.RUNNING
        self.resume_phase = None
        self.paused_at = None
        self.approval_deadline = None
        self._resumed(answered)
        self._go_on()

    def _resumed(self, answered: int) -> None:
        self._emit(
            TaskResumed(
                event_id=derived_event_id(self.task_id, "resumed", answered),
                task_id=self.task_id,
                round=answered,
            )
        )

    def approval_timed_out(self, now: datetime) -> None:
        deadline = self.approval_deadline
        if self.phase is not TaskStatus.AWAITING_APPROVAL or deadline is None or now < deadline:
            return
        waited = (now - self.paused_at).total_seconds() if self.paused_at else 0.0
        self.fail(
            f"{self.exhausted_reason}; no approval came within {waited:.0f} s, so the task stopped"
        )

    def kept_steps(self) -> list[StepState]:
        """Steps a new plan keeps: those done and those still running."""
        return [
            s
            for s in self.steps.values()
            if s.status in {StepStatus.COMPLETED, StepStatus.RUNNING, StepStatus.PAUSED}
        ]

    def used_ids(self) -> set[str]:
        return set(self.steps) | set(self.retired_ids)

    def replan(self, new_steps: list[PlanStep], usage: Usage) -> None:
        """Replace the failed and not yet started steps by ``new_steps`` and go on."""
        if self.phase is not TaskStatus.REPLANNING:
            return
        kept = {s.step.id: s for s in self.kept_steps()}
        self.retired_ids = sorted(set(self.retired_ids) | (set(self.steps) - set(kept)))
        self.steps = {**kept, **{s.id: StepState(step=s) for s in new_steps}}
        self.replans += 1
        self.phase = TaskStatus.RUNNING
        self._planned(usage)
        if self.all_done():
            self.phase = TaskStatus.FINISHING
        else:
            self._dispatch_ready()

    def complete(self, answer: str, usage: Usage) -> None:
        if self.terminal:
            return
        self.phase = TaskStatus.COMPLETED
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
        self.phase = TaskStatus.FAILED
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
        self.phase = TaskStatus.CANCELLED
        self.reason = reason
        self._emit(
            TaskCancelled(
                event_id=derived_event_id(self.task_id, "cancelled"),
                task_id=self.task_id,
                reason=reason,
                usage=self.usage,
            )
        )


def new_state(event: TaskSubmitted, budget: Budget) -> TaskState:
    """A submitted task, to be planned, with its effective budget."""
    return TaskState(
        task_id=event.task_id, goal=event.goal, budget=budget, submitted_at=event.occurred_at
    )


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

REPLAN_SYSTEM = """You are the planner of agentbus. A step of the user's task failed.
Write a new plan for the REMAINING work only, learning from the failure: do not repeat
what failed in the same way. Steps already done or still running are kept; new steps may
depend on them by id. New steps need ids that were never used in this task.

Reply with JSON only, no prose, in exactly this shape:
{"steps": [{"id": "s4", "title": "short name", "instructions": "what to do, precisely",
            "depends_on": ["s1"], "expected_output": "what the step must produce"}]}
An empty list of steps means the work already done answers the task.
"""

ANSWER_SYSTEM = """You are the planner of agentbus. The steps of the user's task are done.
Write the final answer for the user from the step results: state the result plainly,
name the files produced, and keep it short."""


def budget_note(remaining: str) -> str:
    """What the planner tells the model of the budget left, so it plans within it."""
    if not remaining:
        return ""
    return (
        f"\nBudget left for this task: {remaining}. Every step costs LLM calls: "
        "plan no more steps than the budget allows."
    )


def plan_messages(goal: str, budget: Budget, remaining: str = "") -> list[tuple[str, str]]:
    return [
        ("system", PLAN_SYSTEM.replace("{max_steps}", str(budget.max_steps))),
        ("user", f"Task: {goal}{budget_note(remaining)}"),
    ]


def replan_messages(state: TaskState, remaining: str = "") -> list[tuple[str, str]]:
    lines = [f"Task: {state.goal}{budget_note(remaining)}", ""]
    done = [s for s in state.kept_steps() if s.status is StepStatus.COMPLETED]
    running = [s for s in state.kept_steps() if s.status in {StepStatus.RUNNING, StepStatus.PAUSED}]
    if done:
        lines += ["Steps done:"] + [f"[{s.step.id}] {s.step.title}: {s.output}" for s in done]
    if running:
        lines += ["Steps still running:"] + [f"[{s.step.id}] {s.step.title}" for s in running]
    lines += ["Failures:"] + [f"- {f}" for f in state.failures]
    lines += ["", "Ids already used (do not reuse): " + ", ".join(sorted(state.used_ids()))]
    return [("system", REPLAN_SYSTEM), ("user", "\n".join(lines))]


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


def _plan_json(text: str | None) -> Any:
    if not text or not text.strip():
        raise PlanError("the reply was empty; expected a JSON object with a 'steps' list")
    body = _FENCE.sub("", text.strip())
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise PlanError(f"no JSON object in the reply: {text[:200]!r}")
    try:
        return json.loads(body[start : end + 1])
    except json.JSONDecodeError as exc:
        raise PlanError(f"the reply is not valid JSON ({exc.msg} at char {exc.pos})") from exc


def _validate_plan(data: Any) -> Plan:
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        problems = describe_validation(exc, root="plan")
        raise PlanError(f"the plan does not match the schema: {problems}") from exc


def parse_plan(text: str | None, budget: Budget) -> Plan:
    """Parse and validate a plan from the LLM's reply text."""
    plan = _validate_plan(_plan_json(text))
    if len(plan.steps) > budget.max_steps:
        raise PlanError(
            f"the plan has {len(plan.steps)} steps; this task allows at most {budget.max_steps}"
        )
    return plan


def parse_replan(text: str | None, state: TaskState) -> list[PlanStep]:
    """Parse the new steps of a re-plan, validated together with the steps kept."""
    data = _plan_json(text)
    raw_steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(raw_steps, list):
        raise PlanError("the reply must be a JSON object with a 'steps' list")
    if not raw_steps:
        if not state.kept_steps():
            raise PlanError("the new plan is empty, and no step of the task is done yet")
        return []
    kept = [s.step for s in state.kept_steps()]
    plan = _validate_plan({"steps": [*[k.model_dump() for k in kept], *raw_steps]})
    new_steps = plan.steps[len(kept) :]
    reused = sorted({s.id for s in new_steps} & state.used_ids())
    if reused:
        raise PlanError(f"step ids already used in this task: {', '.join(reused)}; pick new ids")
    if len(plan.steps) > state.budget.max_steps:
        raise PlanError(
            f"the plan would have {len(plan.steps)} steps; "
            f"this task allows at most {state.budget.max_steps}"
        )
    return new_steps


def now() -> datetime:
    return utcnow()
