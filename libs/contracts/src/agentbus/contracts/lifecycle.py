"""The task and step lifecycles: one vocabulary for every service and the CLI.

The planner owns both lifecycles: it moves a task and its steps from one status to the
next and publishes each decision as an event. Memory records those decisions in the
task's projection (what ``agentbus tasks`` shows); it never re-derives them.

A task::

    submitted -> planning -> running <-> replanning
                               |  \\-> finishing -> completed
                               v
                        awaiting_approval (a budget ran out; ``TaskPaused``/``TaskResumed``)

    any live status -> failed | cancelled;  cancel_requested: asked, not yet stopped.

Memory alone uses ``submitted`` (no plan seen yet), ``planned`` (a plan, no step
dispatched yet) and ``cancel_requested``; the planner's own state never holds them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class TaskStatus(StrEnum):
    SUBMITTED = "submitted"  # accepted; no plan yet
    PLANNING = "planning"  # the first plan is being made
    PLANNED = "planned"  # a plan exists; no step has been dispatched yet
    RUNNING = "running"
    REPLANNING = "replanning"  # a step failed; a new plan for the rest is being made
    FINISHING = "finishing"  # every step done; the answer is being written
    AWAITING_APPROVAL = "awaiting_approval"  # a budget ran out; waiting for more
    CANCEL_REQUESTED = "cancel_requested"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: Final = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)


# The statuses a task is shown in (memory's projection, the CLI, ``TaskListRequest``):
# planning, replanning and finishing are the planner's working states, never published.
SHOWN_STATUSES: Final = frozenset(TaskStatus) - {
    TaskStatus.PLANNING,
    TaskStatus.REPLANNING,
    TaskStatus.FINISHING,
}


class StepStatus(StrEnum):
    PENDING = "pending"  # waiting for the steps it depends on
    RUNNING = "running"  # dispatched to an executor
    PAUSED = "paused"  # stopped by the task's budget; resumes as a new attempt
    COMPLETED = "completed"
    FAILED = "failed"
