"""The executor's routes and use cases through ``TestNatsBroker``: a ready step runs its
tool loop against an in-memory workspace and a scripted model, on the real budget ledger
and checkpoint store over in-memory KV buckets; what it publishes is recorded."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from faststream.nats import NatsBroker, TestNatsBroker
from opentelemetry import trace

from agentbus.contracts import (
    PlanStep,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepToolCalled,
    TaskCancelRequested,
    ToolOutcome,
    derived_event_id,
    new_id,
)
from agentbus.core.budget import BudgetLedger, BudgetRefused, Ledger, LedgerStatus, Limits
from agentbus.core.kv import CasStore
from agentbus.core.llm import LLMError, Message, ToolCall
from agentbus.core.settings import BusSettings
from agentbus.executor import routes
from agentbus.executor.adapters.checkpoints import CheckpointStore
from agentbus.executor.ports import StepCheckpoint
from agentbus.executor.usecases import Executor
from tests.fakes import (
    MemoryKV,
    MemoryStepTools,
    MemoryWorkspace,
    RecordingPublisher,
    ScriptedModel,
    finish,
    tool_turn,
)

WORKER = "executor-test:1"
MODEL = "scripted-1"
WAIT_S = 5.0  # bound on every wait; each test takes milliseconds
STEP = PlanStep(id="s1", title="compute", instructions="compute the answer")


@dataclass
class Rig:
    llm: ScriptedModel
    tools: MemoryStepTools = field(default_factory=MemoryStepTools)
    publisher: RecordingPublisher = field(default_factory=RecordingPublisher)
    ledger: BudgetLedger = field(
        default_factory=lambda: BudgetLedger(CasStore(MemoryKV().as_kv(), Ledger))
    )
    checkpoints: CheckpointStore = field(
        default_factory=lambda: CheckpointStore(MemoryKV().as_kv())
    )
    use_memory: bool = False
    task_id: str = field(default_factory=lambda: new_id("task"))

    def workspace(self) -> MemoryWorkspace:
        return self.tools.workspace(self.task_id, STEP.id)

    def ready(self, attempt: int = 1) -> StepReady:
        return StepReady(
            task_id=self.task_id, step=STEP, goal="answer the question", attempt=attempt
        )

    @contextlib.asynccontextmanager
    async def broker(self) -> AsyncIterator[NatsBroker]:
        broker = NatsBroker()
        broker.include_router(routes.build_router(BusSettings(), concurrency=2))
        broker.context.set_global(
            routes.USES,
            Executor(
                llm=self.llm,
                ledger=self.ledger,
                checkpoints=self.checkpoints,
                publisher=self.publisher,
                tools=self.tools,
                tracer=trace.get_tracer("test"),
                worker=WORKER,
                model=MODEL,
                max_iterations=5,
                max_tokens=512,
                use_memory=self.use_memory,
            ),
        )
        async with TestNatsBroker(broker) as br:
            yield br


async def send(br: NatsBroker, event: StepReady | TaskCancelRequested) -> None:
    async with asyncio.timeout(WAIT_S):
        await br.publish(event.model_dump(mode="json"), event.subject)


@contextlib.asynccontextmanager
async def step_held_in_a_run(br: NatsBroker, rig: Rig) -> AsyncIterator[asyncio.Task[None]]:
    """A step's handler, running, held in its first sandbox run: yields the handler's
    task, and on leaving waits (bounded) for it to end."""
    workspace = rig.workspace()
    workspace.hold = workspace.hold or asyncio.Event()
    step = asyncio.create_task(send(br, rig.ready()))
    try:
        async with asyncio.timeout(WAIT_S):
            await workspace.running.wait()
        yield step
        async with asyncio.timeout(WAIT_S):
            await asyncio.wait([step])
    finally:
        step.cancel()


async def test_a_ready_step_runs_its_tools_and_reports_its_output_and_files() -> None:
    rig = Rig(
        ScriptedModel(
            tool_turn(("write_file", {"path": "report.txt", "content": "42\n"})),
            tool_turn(("run_python", {"code": "print(6 * 7)"})),
            finish("the answer is 42, in report.txt"),
        )
    )
    rig.workspace().outputs["print(6 * 7)"] = "42"
    async with rig.broker() as br:
        await send(br, rig.ready())

    progress = rig.publisher.of(StepToolCalled)
    assert [(p.tool, p.outcome) for p in progress] == [
        ("write_file", ToolOutcome.OK),
        ("run_python", ToolOutcome.OK),
    ]
    assert "42" in progress[1].output
    assert all(p.step_id == STEP.id and p.task_id == rig.task_id for p in progress)
    assert rig.publisher.types()[-1] == "step.completed"
    [done] = rig.publisher.of(StepCompleted)
    assert done.event_id == derived_event_id(rig.task_id, "step-outcome", STEP.id, 1)
    assert done.output == "the answer is 42, in report.txt"
    assert done.workspace_files == ["report.txt"]
    assert (done.worker, done.attempt) == (WORKER, 1)
    assert done.usage.total.calls == 3
    first = rig.llm.requests[0]
    assert (first.conversation, first.model, first.max_tokens) == ("executor/s1", MODEL, 512)
    assert "compute the answer" in (first.messages[1].content or "")


async def test_an_llm_failure_fails_the_step_with_the_reason() -> None:
    rig = Rig(ScriptedModel(LLMError("the provider answered 500")))
    async with rig.broker() as br:
        await send(br, rig.ready())

    assert rig.publisher.types() == ["step.failed"]
    [failed] = rig.publisher.of(StepFailed)
    assert failed.error == "LLM call failed: the provider answered 500"
    assert failed.event_id == derived_event_id(rig.task_id, "step-outcome", STEP.id, 1)
    assert failed.worker == WORKER


async def test_a_failing_tool_the_model_gives_up_on_fails_the_step() -> None:
    rig = Rig(
        ScriptedModel(
            tool_turn(("run_python", {"code": "parse()"})),
            finish("the data file cannot be parsed", success=False),
        )
    )
    rig.workspace().failures["parse()"] = "NameError: name 'parse' is not defined"
    async with rig.broker() as br:
        await send(br, rig.ready())

    [tool] = rig.publisher.of(StepToolCalled)
    assert tool.outcome is ToolOutcome.ERROR and "NameError" in tool.output
    assert "NameError" in (rig.llm.requests[1].messages[-1].content or "")
    [failed] = rig.publisher.of(StepFailed)
    assert failed.error == "the data file cannot be parsed"
    assert not rig.publisher.of(StepCompleted)


async def test_a_paused_step_keeps_its_dialogue_and_the_next_attempt_resumes_it() -> None:
    rig = Rig(
        ScriptedModel(
            tool_turn(("write_file", {"path": "notes.txt", "content": "half way"})),
            BudgetRefused("tokens budget exhausted: 900 spent of 1000"),
        )
    )
    await rig.ledger.create(Ledger(task_id=rig.task_id, limits=Limits(tokens=1000)))
    async with rig.broker() as br:
        await send(br, rig.ready(attempt=1))
        [paused] = rig.publisher.of(StepPaused)
        assert paused.reason == "tokens budget exhausted: 900 spent of 1000"
        assert paused.event_id == derived_event_id(rig.task_id, "step-outcome", STEP.id, 1)
        saved = await rig.checkpoints.load(rig.task_id, STEP.id)
        assert saved is not None and saved.conversation == "executor/s1"
        assert saved.touched_workspace

        rig.llm.turns.append(finish("notes written"))
        await send(br, rig.ready(attempt=2))

    resumed = rig.llm.requests[-1]
    assert resumed.conversation == "executor/s1"  # the same dialogue, not executor/s1#2
    assert [m.role for m in resumed.messages] == ["system", "user", "assistant", "tool"]
    assert rig.publisher.types()[-1] == "step.completed"
    [done] = rig.publisher.of(StepCompleted)
    assert done.attempt == 2
    assert done.event_id == derived_event_id(rig.task_id, "step-outcome", STEP.id, 2)
    assert done.output == "notes written"
    assert done.workspace_files == ["notes.txt"]  # touched in attempt 1, carried over
    assert await rig.checkpoints.load(rig.task_id, STEP.id) is None


async def test_a_resumed_step_of_an_ended_task_is_skipped() -> None:
    """The checkpoint's last turn has a run left unanswered: resuming would run it before
    any LLM call, so the executor asks the ledger first, and does nothing."""
    rig = Rig(ScriptedModel(finish("should not run")))
    await rig.ledger.create(Ledger(task_id=rig.task_id, limits=Limits()))
    await rig.ledger.close(rig.task_id, "cancelled by user")
    state = await rig.ledger.load(rig.task_id)
    assert state is not None and state.status is LedgerStatus.CLOSED
    pending = Message(
        role="assistant",
        tool_calls=[ToolCall(id="c1", name="run_python", arguments={"code": "print(1)"})],
    )
    checkpoint = StepCheckpoint(
        conversation="executor/s1",
        messages=[Message(role="user", content="compute"), pending],
    )
    await rig.checkpoints.save(rig.task_id, STEP.id, checkpoint)
    async with rig.broker() as br:
        await send(br, rig.ready(attempt=2))

    assert rig.publisher.events == []
    assert rig.llm.requests == []
    assert rig.workspace().runs == []


async def test_a_step_refused_because_its_task_ended_reports_nothing() -> None:
    rig = Rig(ScriptedModel(BudgetRefused("the task was cancelled", closed=True)))
    async with rig.broker() as br:
        await send(br, rig.ready())

    assert rig.publisher.events == []
    assert await rig.checkpoints.load(rig.task_id, STEP.id) is None


async def test_a_cancel_request_stops_the_running_step_and_nothing_more_is_said() -> None:
    rig = Rig(
        ScriptedModel(
            tool_turn(("write_file", {"path": "a.txt", "content": "a"})),
            tool_turn(("run_python", {"code": "import time; time.sleep(600)"})),
            finish("never reached"),
        )
    )
    async with rig.broker() as br, step_held_in_a_run(br, rig) as step:
        before = list(rig.publisher.events)
        assert [e.event_type for e in before] == ["step.tool_called"]
        await send(br, TaskCancelRequested(task_id=rig.task_id))

    assert step.result() is None  # the handler returned: the event is acknowledged
    assert rig.workspace().stopped
    assert rig.publisher.events == before
    assert len(rig.llm.requests) == 2  # the model is not asked again


async def test_a_cancellation_landing_as_a_tool_returns_still_silences_the_step() -> None:
    """The run's reply was in when the cancellation landed, so the step goes on: neither
    that tool's progress nor the step's outcome is published."""
    rig = Rig(
        ScriptedModel(
            tool_turn(("run_python", {"code": "print(1)"})),
            finish("finished after the cancellation"),
        )
    )
    rig.workspace().late_reply = True
    async with rig.broker() as br, step_held_in_a_run(br, rig) as step:
        await send(br, TaskCancelRequested(task_id=rig.task_id))

    assert step.result() is None
    assert rig.workspace().stopped
    assert rig.publisher.events == []


async def test_a_step_interrupted_by_shutdown_says_nothing_and_is_left_to_redeliver() -> None:
    """The replica stops while a step runs: the handler itself is cancelled, and the
    cancellation goes on up (the event is not acknowledged), unlike a task's cancel."""
    rig = Rig(ScriptedModel(tool_turn(("run_python", {"code": "print(1)"}))))
    async with rig.broker() as br, step_held_in_a_run(br, rig) as step:
        step.cancel()

    assert step.cancelled()
    assert rig.workspace().stopped
    assert rig.publisher.events == []


async def test_with_memory_on_a_step_recalls_memories_and_saves_its_result() -> None:
    rig = Rig(ScriptedModel(finish("the total is 7")), use_memory=True)
    rig.tools.notes.recalled = ["the user wants totals in euros"]
    async with rig.broker() as br:
        await send(br, rig.ready())

    assert "the user wants totals in euros" in (rig.llm.requests[0].messages[1].content or "")
    assert [kind for _, kind in rig.tools.notes.saved] == ["step_result"]
    assert "the total is 7" in rig.tools.notes.saved[0][0]
    assert rig.publisher.of(StepCompleted)[0].output == "the total is 7"
