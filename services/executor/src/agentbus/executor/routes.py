"""The executor's routes: a ready step runs its tool loop (on a durable consumer shared
by all replicas, kept in progress while it runs); a cancellation stops the task's
running steps at once."""

from __future__ import annotations

from typing import Annotated

from faststream import Context
from faststream.nats import NatsRouter

from agentbus.contracts import StepReady, TaskCancelRequested, subjects
from agentbus.core.bus import event_route
from agentbus.core.settings import BusSettings

from .usecases import Executor

USES = "agentbus_executor"
Uses = Annotated[Executor, Context(USES)]


def build_router(bus: BusSettings, *, concurrency: int) -> NatsRouter:
    """The executor's subscribers; ``concurrency`` steps run at once per replica."""
    router = NatsRouter()

    event_route(
        router,
        StepReady,
        Executor.run_step,
        uses=USES,
        durable=subjects.EXECUTOR_STEPS_DURABLE,
        settings=bus,
        max_workers=concurrency,
    )

    # Every replica hears every cancellation (core NATS, no queue group): each stops its
    # own steps of the task. The planner closes the task's ledger, so nothing new starts.
    # no_reply: the publisher's reply inbox belongs to JetStream's acknowledgement.
    @router.subscriber(subjects.event_type_filter(TaskCancelRequested.event_type), no_reply=True)
    async def on_cancel_requested(event: TaskCancelRequested, uses: Uses) -> None:
        uses.cancel(event.task_id)

    return router
