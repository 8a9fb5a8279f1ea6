"""The gateway's HTTP API models (``/v1``), for apps and the CLI: what is not already a
bus message. Errors are RFC 9457 problem details (:class:`Problem`)."""

from __future__ import annotations

from pydantic import Field

from .models import Budget, BudgetAddition, Contract
from .rpc import StepSummary, TaskSummary


class SubmitTask(Contract):
    goal: str = Field(min_length=1, max_length=20_000, description="The task in plain words.")
    budget: Budget = Field(default_factory=Budget, description="Limits of the task.")


class TaskCreated(Contract):
    task_id: str = Field(description="The new task's id.")
    events_url: str = Field(description="Where its events stream (SSE).")


class TaskDetail(Contract):
    task: TaskSummary = Field(description="Status, answer or error, and cost.")
    steps: list[StepSummary] = Field(
        default_factory=list, description="The current plan's steps and where each stands."
    )


class TaskPage(Contract):
    tasks: list[TaskSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= for the next page; None on the last page."
    )


class CancelTask(Contract):
    reason: str = Field("cancelled by user", max_length=2000, description="Why to stop.")


class ApproveTask(BudgetAddition):
    """The body of ``POST /v1/tasks/{id}/approve``: what to add (as ``TaskApproved``)."""


class Accepted(Contract):
    task_id: str = Field(description="The task the request was for.")
    event_id: str = Field(description="The event published for it.")


class ProblemField(Contract):
    field: str = Field(description="Where in the request, e.g. body.budget.max_steps.")
    message: str = Field(description="What is wrong with it.")


class Problem(Contract):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = Field("about:blank", description="A URI naming the kind of problem.")
    title: str = Field(description="The kind of problem, in words.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field("", description="This occurrence, in words.")
    errors: list[ProblemField] = Field(
        default_factory=list, description="The fields that are wrong, for a bad request."
    )
