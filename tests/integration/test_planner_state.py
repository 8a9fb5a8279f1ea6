"""The planner's task state in JetStream KV under concurrent writers (real nats-server)."""

from __future__ import annotations

import asyncio

import pytest

from agentbus.cli import client
from agentbus.contracts import (
    Budget,
    Plan,
    PlanStep,
    StepCompleted,
    TaskStatus,
    TaskSubmitted,
    Usage,
    new_id,
)
from agentbus.core.bus import jetstream
from agentbus.planner import domain
from agentbus.planner.adapters.state import TaskStore
from agentbus.planner.domain import TaskState

pytestmark = pytest.mark.integration


async def test_concurrent_writers_never_lose_or_double_an_update(nats_url: str) -> None:
    async with client.connect(nats_url) as broker:
        js = jetstream(broker)
        store = await TaskStore.open(js, f"test_state_{new_id('b')}")
        submitted = TaskSubmitted(task_id=new_id("tsk"), goal="g", budget=Budget(max_steps=30))
        plan = Plan(steps=[PlanStep(id=f"s{i}", title="t", instructions="i") for i in range(20)])

        def create(current: TaskState | None) -> TaskState | None:
            state = domain.new_state(submitted, submitted.budget)
            state.start(plan, Usage())
            return state

        await store.mutate(submitted.task_id, create)
        events = [
            StepCompleted(task_id=submitted.task_id, step_id=f"s{i}", output=str(i))
            for i in range(20)
        ]

        async def complete(event: StepCompleted) -> None:
            def apply(current: TaskState | None) -> TaskState | None:
                if current is None or current.was_applied(event):
                    return None
                current.step_completed(event)
                current.mark_applied(event)
                return current

            await store.mutate(submitted.task_id, apply, attempts=100)

        # 20 distinct completions, each delivered twice, all at once.
        await asyncio.gather(*(complete(e) for e in events + events))
        loaded = await store.load(submitted.task_id)
        assert loaded is not None
        state = loaded[0]
        assert sorted(state.applied) == sorted(e.event_id for e in events)
        assert {s.output for s in state.steps.values()} == {str(i) for i in range(20)}
        assert state.phase is TaskStatus.FINISHING
