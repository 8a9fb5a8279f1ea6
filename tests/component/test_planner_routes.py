"""The planner's routes and use cases through FastStream's TestNatsBroker, on fakes:
the real state store and budget ledger over an in-memory KV bucket, in-memory timers,
a scripted model and a recording publisher. The integration tests prove the same
paths with a real nats-server (tests/integration/test_spend_control.py and others)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from faststream.nats import NatsBroker, TestNatsBroker

from agentbus.contracts import (
    Budget,
    BudgetExhausted,
    BudgetFigure,
    BudgetKind,
    Event,
    LedgerStatus,
    OnBudget,
    PlanCreated,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    TaskApproved,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
)
from agentbus.core.budget import BudgetLedger, Ledger
from agentbus.core.kv import CasStore
from agentbus.core.llm import LLMError, Message
from agentbus.core.settings import BusSettings
from agentbus.planner import domain
from agentbus.planner.adapters.state import TaskStore
from agentbus.planner.config import BudgetDefaults
from agentbus.planner.routes import USES, build_router
from agentbus.planner.usecases import Planner
from tests.fakes import MemoryKV, MemoryTimers, RecordingPublisher, ScriptedModel

TASK = "tsk_component"


def plan_reply(*steps: tuple[str, list[str]]) -> Message:
    body = {
        "steps": [
            {"id": i, "title": f"step {i}", "instructions": "do it", "depends_on": deps}
            for i, deps in steps
        ]
    }
    return Message(role="assistant", content=json.dumps(body))


def answer(text: str) -> Message:
    return Message(role="assistant", content=text)


@dataclass
class Rig:
    broker: NatsBroker
    planner: Planner
    model: ScriptedModel
    published: RecordingPublisher
    timers: MemoryTimers
    ledger: BudgetLedger
    states: TaskStore

    async def send(self, event: Event) -> None:
        await self.broker.publish(event.model_dump(mode="json"), event.subject)

    async def state(self) -> domain.TaskState:
        found = await self.states.load(TASK)
        assert found is not None
        return found[0]

    async def ledger_of(self) -> Ledger:
        ledger = await self.ledger.load(TASK)
        assert ledger is not None
        return ledger


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    model = ScriptedModel()
    published = RecordingPublisher()
    timers = MemoryTimers()
    ledger = BudgetLedger(CasStore(MemoryKV().as_kv(), Ledger))
    states = TaskStore(MemoryKV().as_kv(), domain.TaskState)
    planner = Planner(
        states=states,
        timers=timers,
        ledger=ledger,
        llm=model,
        publisher=published,
        model="scripted-1",
        max_tokens=256,
        defaults=BudgetDefaults(),
    )
    broker = NatsBroker()
    broker.include_router(build_router(BusSettings()))
    broker.context.set_global(USES, planner)
    async with TestNatsBroker(broker) as test_broker:
        yield Rig(test_broker, planner, model, published, timers, ledger, states)


async def test_a_submitted_task_is_planned_and_its_ready_steps_dispatched(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []), ("b", []), ("c", ["a", "b"]))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="count primes", budget=Budget()))

    assert rig.published.types() == ["task.plan_created", "step.ready", "step.ready"]
    assert [e.step.id for e in rig.published.of(StepReady)] == ["a", "b"]
    assert (await rig.state()).outbox == []  # published, then cleared from the state
    assert (await rig.ledger_of()).status is LedgerStatus.OPEN
    assert TASK in rig.timers.deadlines  # the end of its time budget
    (request,) = rig.model.requests
    assert request.conversation == "planner/plan" and request.json_output


async def test_a_redelivered_submission_changes_nothing(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    submitted = TaskSubmitted(task_id=TASK, goal="g")
    await rig.send(submitted)
    await rig.send(submitted)
    assert rig.published.types() == ["task.plan_created", "step.ready"]
    assert len(rig.model.requests) == 1


async def test_the_last_step_done_writes_the_answer_and_closes_the_ledger(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", [])), answer("  42 primes  ")]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g"))
    await rig.send(StepCompleted(task_id=TASK, step_id="a", output="42", workspace_files=["p.txt"]))

    (done,) = rig.published.of(TaskCompleted)
    assert (done.answer, done.artifacts) == ("42 primes", ["p.txt"])
    assert (await rig.ledger_of()).status is LedgerStatus.CLOSED
    assert TASK not in rig.timers.deadlines


async def test_an_invalid_plan_is_repaired_once_then_the_task_fails(rig: Rig) -> None:
    rig.model.turns = [answer("no json here"), answer("{}")]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g"))
    (failed,) = rig.published.of(TaskFailed)
    assert failed.reason.startswith("planning failed: the LLM gave no valid plan after one repair")
    assert "no JSON object" in rig.model.requests[1].messages[-1].content  # type: ignore[operator]


async def test_a_failed_step_is_re_planned_with_fresh_ids(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", [])), plan_reply(("a2", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_replans=1)))
    await rig.send(StepFailed(task_id=TASK, step_id="a", error="boom"))

    plans = rig.published.of(PlanCreated)
    assert [p.revision for p in plans] == [1, 2]
    assert [s.id for s in plans[1].steps] == ["a2"]
    assert rig.published.of(StepReady)[-1].step.id == "a2"
    assert rig.model.requests[1].conversation == "planner/replan-1"


async def test_an_llm_error_while_answering_fails_the_task(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", [])), LLMError("the server is down")]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g"))
    await rig.send(StepCompleted(task_id=TASK, step_id="a", output="x"))
    (failed,) = rig.published.of(TaskFailed)
    assert "writing the final answer failed" in failed.reason
    assert (await rig.ledger_of()).status is LedgerStatus.CLOSED


def exhausted(deadline_s: float = 3600) -> BudgetExhausted:
    return BudgetExhausted(
        task_id=TASK,
        figure=BudgetFigure(kind=BudgetKind.COST, used=1, limit=1),
        reason="cost budget exhausted; waiting for approval: agentbus approve",
        cause="cost budget exhausted",
        action=OnBudget.PAUSE,
        approval_deadline=domain.now() + timedelta(seconds=deadline_s),
        step_id="a",
    )


async def test_a_pause_is_published_and_an_approval_resumes_the_paused_step(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_cost_usd=1)))
    pause = exhausted()
    await rig.send(pause)
    await rig.send(StepPaused(task_id=TASK, step_id="a", reason="budget", attempt=1))

    (paused,) = rig.published.of(TaskPaused)
    assert (paused.round, paused.reason) == (0, "cost budget exhausted")
    assert (await rig.state()).phase is TaskStatus.AWAITING_APPROVAL
    assert rig.timers.deadlines[TASK] == pause.approval_deadline

    await rig.send(TaskApproved(task_id=TASK, add_cost_usd=2))
    (resumed,) = rig.published.of(TaskResumed)
    assert resumed.round == 0
    assert [(e.step.id, e.attempt) for e in rig.published.of(StepReady)] == [("a", 1), ("a", 2)]
    ledger = await rig.ledger_of()
    assert (ledger.limits.cost_usd, ledger.round) == (3, 1)


async def test_a_step_paused_after_the_approval_goes_on_at_once(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_cost_usd=1)))
    await rig.send(TaskApproved(task_id=TASK, add_cost_usd=1))  # the ledger stays open
    await rig.send(StepPaused(task_id=TASK, step_id="a", reason="budget", attempt=1))
    assert [e.attempt for e in rig.published.of(StepReady)] == [1, 2]
    assert rig.published.of(TaskPaused) == []


async def test_a_step_paused_by_a_paused_ledger_republishes_its_exhaustion(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_cost_usd=1)))
    flipped, _ = await rig.ledger.pause(TASK, BudgetKind.COST, 1, 1, "cost budget exhausted")
    assert flipped
    await rig.send(StepPaused(task_id=TASK, step_id="a", reason="budget", attempt=1))
    (again,) = rig.published.of(BudgetExhausted)  # the pausing caller may have crashed
    assert again.cause == "cost budget exhausted"


async def test_the_sweep_fails_a_task_whose_approval_did_not_come(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_cost_usd=1)))
    await rig.send(exhausted(deadline_s=-1))  # the deadline has passed already
    await rig.planner.sweep()

    (failed,) = rig.published.of(TaskFailed)
    assert failed.reason.startswith("cost budget exhausted; no approval came within")
    assert (await rig.ledger_of()).status is LedgerStatus.CLOSED
    assert rig.timers.deadlines == {}


async def test_the_sweep_forgets_a_deadline_of_a_task_that_goes_on(rig: Rig) -> None:
    rig.timers.deadlines["tsk_gone"] = domain.now() - timedelta(seconds=1)
    await rig.planner.sweep()
    assert rig.timers.deadlines == {}
    assert rig.published.events == []


async def test_a_task_out_of_time_pauses_its_ledger(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []), ("b", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g", budget=Budget(max_wall_seconds=1)))
    await rig.states.mutate(
        TASK,
        lambda s: (
            s.model_copy(update={"submitted_at": s.submitted_at - timedelta(seconds=5)})
            if s
            else None
        ),
    )
    await rig.send(StepCompleted(task_id=TASK, step_id="a", output="A"))

    (ran_out,) = rig.published.of(BudgetExhausted)
    assert ran_out.figure.kind is BudgetKind.TIME
    assert (await rig.ledger_of()).status is LedgerStatus.PAUSED


async def test_a_cancel_request_cancels_the_task_and_closes_its_ledger(rig: Rig) -> None:
    rig.model.turns = [plan_reply(("a", []))]
    await rig.send(TaskSubmitted(task_id=TASK, goal="g"))
    await rig.send(TaskCancelRequested(task_id=TASK, reason="by user"))
    (cancelled,) = rig.published.of(TaskCancelled)
    assert cancelled.reason == "by user"
    ledger = await rig.ledger_of()
    assert (ledger.status, ledger.closed_reason) == (LedgerStatus.CLOSED, "the task has cancelled")


async def test_an_event_of_an_unknown_task_is_dropped(rig: Rig) -> None:
    await rig.send(StepCompleted(task_id=TASK, step_id="a", output="x"))
    assert rig.published.events == []
    assert await rig.states.load(TASK) is None  # no state was made up for it
