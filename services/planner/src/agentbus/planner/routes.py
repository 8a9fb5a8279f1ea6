"""The planner's routes: one durable consumer per event type it acts on (shared by all
replicas), each calling one use case of :class:`Planner`. The route binds the step to
the logs and keeps the message in progress while the use case works (planning can
take a while); see ``agentbus.core.bus.event_route``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from faststream.nats import NatsRouter

from agentbus import contracts
from agentbus.contracts import Event, subjects
from agentbus.core.bus import event_route
from agentbus.core.settings import BusSettings

from .usecases import Planner

USES = "agentbus_planner"  # the context key main.py provides the Planner under

ROUTES: tuple[tuple[type[Event], Callable[[Planner, Any], Awaitable[None]]], ...] = (
    (contracts.TaskSubmitted, Planner.submitted),
    (contracts.StepCompleted, Planner.step_completed),
    (contracts.StepFailed, Planner.step_failed),
    (contracts.StepPaused, Planner.step_paused),
    (contracts.BudgetExhausted, Planner.budget_exhausted),
    (contracts.TaskApproved, Planner.approved),
    (contracts.TaskCancelRequested, Planner.cancel_requested),
)


def build_router(bus: BusSettings) -> NatsRouter:
    router = NatsRouter()
    for event_type, use_case in ROUTES:
        event_route(
            router,
            event_type,
            use_case,
            uses=USES,
            durable=subjects.planner_durable(event_type.event_type),
            settings=bus,
            max_workers=4,
        )
    return router
