"""Executor handlers: take a ready step, run its tool loop, report the outcome; stop a
cancelled task's running steps at once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from faststream.nats import NatsBroker, NatsMessage
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from agentbus.contracts import (
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepToolCalled,
    TaskCancelRequested,
    derived_event_id,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.budget import BudgetLedger, LedgerStatus
from agentbus.core.bus import (
    RpcError,
    event_subscriber,
    instance_id,
    keep_in_progress,
    publish_event,
)
from agentbus.core.llm import LLMProvider
from agentbus.core.settings import BusSettings, LLMSettings

from .adapters.checkpoints import CheckpointStore, StepCheckpoint
from .adapters.memory import MemoryClient
from .adapters.sandbox import SandboxWorkspace
from .domain import StepResult, StepRunner, ToolEvent

log = structlog.get_logger(__name__)


@dataclass
class ExecutorDeps:
    broker: NatsBroker
    bus: BusSettings
    llm_settings: LLMSettings
    max_iterations: int
    concurrency: int
    use_memory: bool = True
    sandbox_cpus: float = 1.0
    tracer_provider: TracerProvider | None = None
    llm: LLMProvider | None = None
    ledger: BudgetLedger | None = None
    checkpoints: CheckpointStore | None = None
    running: dict[str, set[asyncio.Task[StepResult]]] = field(default_factory=dict)
    cancelled: dict[str, None] = field(default_factory=dict)  # recent, oldest first

    async def publish(self, event: Event) -> None:
        await publish_event(self.broker, event)

    def ready(self) -> tuple[LLMProvider, BudgetLedger, CheckpointStore]:
        if self.llm is None or self.ledger is None or self.checkpoints is None:
            raise RuntimeError("executor adapters are not open yet")  # pragma: no cover
        return self.llm, self.ledger, self.checkpoints


def outcome_event_id(event: StepReady) -> str:
    """One outcome per dispatch: if a step is run again after an executor crash, its
    outcome carries the same id and JetStream keeps only the first."""
    return derived_event_id(event.task_id, "step-outcome", event.step.id, event.attempt)


def _outcome(event: StepReady, result: StepResult, files: list[str]) -> Event:
    common = {
        "event_id": outcome_event_id(event),
        "task_id": event.task_id,
        "step_id": event.step.id,
        "usage": result.usage,
        "attempt": event.attempt,
        "worker": instance_id(),
    }
    if result.ok:
        return StepCompleted(output=result.output[:20_000], workspace_files=files, **common)
    if result.paused:
        return StepPaused(reason=result.error[:20_000], **common)
    return StepFailed(error=result.error[:20_000], **common)


async def run_step(deps: ExecutorDeps, event: StepReady, msg: NatsMessage) -> None:
    llm, ledger, checkpoints = deps.ready()
    # A paused attempt's dialogue, if any. Whether the task has ended is the ledger's
    # answer to the first LLM call: a closed ledger refuses it and the step stops. A
    # resumed step may first run the tool calls its paused turn had left, before any
    # call, so it asks the ledger itself.
    saved = await checkpoints.load(event.task_id, event.step.id)
    if saved is not None:
        state = await ledger.load(event.task_id)
        if state is not None and state.status is LedgerStatus.CLOSED:
            log.info("step skipped: the task has ended", reason=state.closed_reason)
            return
    tracer = trace.get_tracer("agentbus.executor", tracer_provider=deps.tracer_provider)
    workspace = SandboxWorkspace(
        deps.broker,
        event.task_id,
        deps.bus.rpc_timeout_s,
        tracer=tracer,
        ledger=ledger,
        publish=deps.publish,
        step_id=event.step.id,
        cpus=deps.sandbox_cpus,
    )
    runner = StepRunner(
        llm=llm,
        workspace=workspace,
        memory=(
            MemoryClient(deps.broker, event.task_id, deps.bus.rpc_timeout_s)
            if deps.use_memory
            else None
        ),
        model=deps.llm_settings.model_for("executor"),
        max_iterations=deps.max_iterations,
        max_tokens=deps.llm_settings.max_tokens,
    )

    async def progress(tool: ToolEvent) -> None:
        if event.task_id in deps.cancelled:
            return  # a cancellation can land just as a tool returns: say nothing more
        await deps.publish(
            StepToolCalled(
                task_id=event.task_id,
                step_id=event.step.id,
                tool=tool.tool,
                summary=tool.summary,
                output=tool.output,
                outcome=tool.outcome,
                duration_ms=tool.duration_ms,
            )
        )

    # A paused attempt left its dialogue behind: go on from there, as the same dialogue.
    suffix = "" if event.attempt == 1 else f"#{event.attempt}"
    conversation = saved.conversation if saved else f"executor/{event.step.id}{suffix}"
    log.info("step started", attempt=event.attempt, resumed=saved is not None)
    attributes = {semconv.TASK_ID: event.task_id, semconv.STEP_ID: event.step.id}
    with tracer.start_as_current_span(
        f"{semconv.SPAN_STEP} {event.step.id}", attributes=attributes
    ):
        async with keep_in_progress(msg, every_s=deps.bus.ack_wait_s / 3):
            run = asyncio.create_task(
                runner.run(
                    goal=event.goal,
                    step=event.step,
                    inputs=event.inputs,
                    conversation=conversation,
                    task_id=event.task_id,
                    progress=progress,
                    resume=saved.messages if saved else None,
                    touched=saved.touched_workspace if saved else False,
                )
            )
            deps.running.setdefault(event.task_id, set()).add(run)
            try:
                result = await run
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this replica is shutting down: the step is redelivered
                log.info("step stopped: the task was cancelled")
                return
            finally:
                running = deps.running.get(event.task_id, set())
                running.discard(run)
                if not running:
                    deps.running.pop(event.task_id, None)
    if result.cancelled or event.task_id in deps.cancelled:
        log.info("step stopped: the task has ended", reason=result.error or "cancelled")
        return
    if result.paused:
        await checkpoints.save(
            event.task_id,
            event.step.id,
            StepCheckpoint(
                conversation=conversation,
                messages=result.checkpoint,
                touched_workspace=result.touched_workspace,
            ),
        )
    elif saved is not None:
        await checkpoints.drop(event.task_id, event.step.id)
    files: list[str] = []
    if result.ok and result.touched_workspace:
        try:
            files = await workspace.file_names()
        except RpcError as exc:
            log.warning("could not list the workspace", error=str(exc))
    log.info("step finished", ok=result.ok, paused=result.paused, iterations=result.iterations)
    await deps.publish(_outcome(event, result, files))


_CANCELLED_KEEP = 1000


def cancel_running(deps: ExecutorDeps, task_id: str) -> int:
    """Stop this replica's running steps of a task; returns how many. The task is also
    remembered: a step whose last await finished just as it was cancelled (asyncio may
    then drop the cancellation) publishes nothing more."""
    deps.cancelled[task_id] = None
    while len(deps.cancelled) > _CANCELLED_KEEP:
        del deps.cancelled[next(iter(deps.cancelled))]
    tasks = deps.running.pop(task_id, set())
    for task in tasks:
        task.cancel()
    return len(tasks)


def register(deps: ExecutorDeps) -> None:
    @event_subscriber(
        deps.broker,
        StepReady,
        durable=subjects.EXECUTOR_STEPS_DURABLE,
        settings=deps.bus,
        max_workers=deps.concurrency,
    )
    async def on_step_ready(event: StepReady, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step.id)
        await run_step(deps, event, msg)

    # Every replica hears every cancellation (core NATS, no queue group): each stops its
    # own steps of the task. The planner closes the task's ledger, so nothing new starts.
    # no_reply: the publisher's reply inbox belongs to JetStream's acknowledgement.
    @deps.broker.subscriber(
        subjects.event_type_filter(TaskCancelRequested.event_type), no_reply=True
    )
    async def on_cancel_requested(event: TaskCancelRequested) -> None:
        stopped = cancel_running(deps, event.task_id)
        if stopped:
            log.info("cancelled running steps", task_id=event.task_id, steps=stopped)
