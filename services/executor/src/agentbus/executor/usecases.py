"""The executor's use cases: take a ready step, run its tool loop, report the outcome;
stop a cancelled task's running steps at once."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog
from opentelemetry.trace import Tracer

from agentbus.contracts import (
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepToolCalled,
    derived_event_id,
)
from agentbus.core import semconv
from agentbus.core.budget import LedgerStatus
from agentbus.core.ports import RpcError

from .domain import StepResult, StepRunner, ToolEvent
from .ports import Checkpoints, LedgerReader, LLMProvider, Publisher, StepCheckpoint, StepTools

log = structlog.get_logger(__name__)

_CANCELLED_KEEP = 1000


def outcome_event_id(event: StepReady) -> str:
    """One outcome per dispatch: if a step is run again after an executor crash, its
    outcome carries the same id and JetStream keeps only the first."""
    return derived_event_id(event.task_id, "step-outcome", event.step.id, event.attempt)


def _outcome(event: StepReady, result: StepResult, files: list[str], worker: str) -> Event:
    common = {
        "event_id": outcome_event_id(event),
        "task_id": event.task_id,
        "step_id": event.step.id,
        "usage": result.usage,
        "attempt": event.attempt,
        "worker": worker,
    }
    if result.ok:
        return StepCompleted(output=result.output[:20_000], workspace_files=files, **common)
    if result.paused:
        return StepPaused(reason=result.error[:20_000], **common)
    return StepFailed(error=result.error[:20_000], **common)


class RunningSteps:
    """This replica's running steps, by task, and the tasks cancelled lately (oldest
    first, the last ``keep`` of them)."""

    def __init__(self, keep: int = _CANCELLED_KEEP) -> None:
        self._running: dict[str, set[asyncio.Task[StepResult]]] = {}
        self._cancelled: dict[str, None] = {}
        self._keep = keep

    def add(self, task_id: str, run: asyncio.Task[StepResult]) -> None:
        self._running.setdefault(task_id, set()).add(run)

    def discard(self, task_id: str, run: asyncio.Task[StepResult]) -> None:
        running = self._running.get(task_id, set())
        running.discard(run)
        if not running:
            self._running.pop(task_id, None)

    def cancelled(self, task_id: str) -> bool:
        return task_id in self._cancelled

    def cancel(self, task_id: str) -> int:
        """Stop this replica's running steps of a task; returns how many. The task is also
        remembered: a step whose last await finished just as it was cancelled (asyncio may
        then drop the cancellation) publishes nothing more."""
        self._cancelled[task_id] = None
        while len(self._cancelled) > self._keep:
            del self._cancelled[next(iter(self._cancelled))]
        tasks = self._running.pop(task_id, set())
        for task in tasks:
            task.cancel()
        return len(tasks)


@dataclass(kw_only=True)
class Executor:
    """Runs ready steps as tool loops and stops the steps of cancelled tasks. ``worker``
    names this replica in the outcomes it publishes."""

    llm: LLMProvider
    ledger: LedgerReader
    checkpoints: Checkpoints
    publisher: Publisher
    tools: StepTools
    tracer: Tracer
    worker: str
    model: str
    max_iterations: int
    max_tokens: int
    use_memory: bool
    running: RunningSteps = field(default_factory=RunningSteps)

    async def run_step(self, event: StepReady) -> None:
        # A paused attempt's dialogue, if any. Whether the task has ended is the ledger's
        # answer to the first LLM call: a closed ledger refuses it and the step stops. A
        # resumed step may first run the tool calls its paused turn had left, before any
        # call, so it asks the ledger itself.
        saved = await self.checkpoints.load(event.task_id, event.step.id)
        if saved is not None:
            state = await self.ledger.load(event.task_id)
            if state is not None and state.status is LedgerStatus.CLOSED:
                log.info("step skipped: the task has ended", reason=state.closed_reason)
                return
        workspace = self.tools.workspace(event.task_id, event.step.id)
        runner = StepRunner(
            llm=self.llm,
            workspace=workspace,
            memory=self.tools.memory(event.task_id) if self.use_memory else None,
            model=self.model,
            max_iterations=self.max_iterations,
            max_tokens=self.max_tokens,
        )

        async def progress(tool: ToolEvent) -> None:
            if self.running.cancelled(event.task_id):
                return  # a cancellation can land just as a tool returns: say nothing more
            await self.publisher.publish(
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
        with self.tracer.start_as_current_span(
            f"{semconv.SPAN_STEP} {event.step.id}", attributes=attributes
        ):
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
            self.running.add(event.task_id, run)
            try:
                result = await run
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this replica is shutting down: the step is redelivered
                log.info("step stopped: the task was cancelled")
                return
            finally:
                self.running.discard(event.task_id, run)
        if result.cancelled or self.running.cancelled(event.task_id):
            log.info("step stopped: the task has ended", reason=result.error or "cancelled")
            return
        if result.paused:
            await self.checkpoints.save(
                event.task_id,
                event.step.id,
                StepCheckpoint(
                    conversation=conversation,
                    messages=result.checkpoint,
                    touched_workspace=result.touched_workspace,
                ),
            )
        elif saved is not None:
            await self.checkpoints.drop(event.task_id, event.step.id)
        files: list[str] = []
        if result.ok and result.touched_workspace:
            try:
                files = await workspace.file_names()
            except RpcError as exc:
                log.warning("could not list the workspace", error=str(exc))
        log.info("step finished", ok=result.ok, paused=result.paused, iterations=result.iterations)
        await self.publisher.publish(_outcome(event, result, files, self.worker))

    def cancel(self, task_id: str) -> int:
        """Stop this replica's running steps of the task (see :meth:`RunningSteps.cancel`);
        returns how many."""
        stopped = self.running.cancel(task_id)
        if stopped:
            log.info("cancelled running steps", task_id=task_id, steps=stopped)
        return stopped
