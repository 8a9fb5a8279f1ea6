"""The planner's routes: one durable consumer per event type it acts on, shared by all
replicas. Each handler binds the task to the logs, keeps the message in progress while
the use case works (planning can take a while) and calls one use case."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import structlog
from faststream import Context
from faststream.nats import NatsMessage, NatsRouter

from agentbus.contracts import (
    BudgetExhausted,
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    TaskApproved,
    TaskCancelRequested,
    TaskSubmitted,
    subjects,
)
from agentbus.core.bus import event_subscriber, keep_in_progress
from agentbus.core.settings import BusSettings

from .usecases import Planner

USES = "agentbus_planner"
Uses = Annotated[Planner, Context(USES)]


def build_router(bus: BusSettings) -> NatsRouter:
    router = NatsRouter()
    beat_s = bus.ack_wait_s / 3

    def durable(event_type: type[Event]) -> Callable[[Any], Any]:
        return event_subscriber(
            router,
            event_type,
            durable=subjects.planner_durable(event_type.event_type),
            settings=bus,
            max_workers=4,
        )

    def working(msg: NatsMessage, event: Event, step_id: str | None = None) -> Any:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        if step_id is not None:
            structlog.contextvars.bind_contextvars(step_id=step_id)
        return keep_in_progress(msg, every_s=beat_s)

    @durable(TaskSubmitted)
    async def on_submitted(event: TaskSubmitted, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event):
            await uses.submitted(event)

    @durable(StepCompleted)
    async def on_step_completed(event: StepCompleted, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event, event.step_id):
            await uses.step_completed(event)

    @durable(StepFailed)
    async def on_step_failed(event: StepFailed, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event, event.step_id):
            await uses.step_failed(event)

    @durable(StepPaused)
    async def on_step_paused(event: StepPaused, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event, event.step_id):
            await uses.step_paused(event)

    @durable(BudgetExhausted)
    async def on_budget_exhausted(event: BudgetExhausted, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event):
            await uses.budget_exhausted(event)

    @durable(TaskApproved)
    async def on_approved(event: TaskApproved, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event):
            await uses.approved(event)

    @durable(TaskCancelRequested)
    async def on_cancel(event: TaskCancelRequested, msg: NatsMessage, uses: Uses) -> None:
        async with working(msg, event):
            await uses.cancel_requested(event)

    return router
