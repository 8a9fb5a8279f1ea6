"""Executor handler: take a ready step, run its tool loop, report the outcome."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from faststream.nats import NatsBroker, NatsMessage
from opentelemetry import trace
from opentelemetry.trace import TracerProvider

from agentbus.contracts import (
    StepCompleted,
    StepFailed,
    StepReady,
    StepToolCalled,
    derived_event_id,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.bus import (
    RpcError,
    event_subscriber,
    instance_id,
    keep_in_progress,
    publish_event,
)
from agentbus.core.llm import LLMProvider
from agentbus.core.settings import BusSettings, LLMSettings

from .adapters.memory import MemoryClient
from .adapters.sandbox import SandboxWorkspace
from .domain import StepRunner, ToolEvent

log = structlog.get_logger(__name__)
WORKER = instance_id()


@dataclass
class ExecutorDeps:
    broker: NatsBroker
    bus: BusSettings
    llm_settings: LLMSettings
    max_iterations: int
    concurrency: int
    use_memory: bool = True
    tracer_provider: TracerProvider | None = None
    llm: LLMProvider | None = None


def outcome_event_id(event: StepReady) -> str:
    """One outcome per dispatch: if a step is run again after an executor crash, its
    outcome carries the same id and JetStream keeps only the first."""
    return derived_event_id(event.task_id, "step-outcome", event.step.id, event.attempt)


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
        if deps.llm is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("executor LLM provider is not built yet")
        tracer = trace.get_tracer("agentbus.executor", tracer_provider=deps.tracer_provider)
        workspace = SandboxWorkspace(
            deps.broker, event.task_id, deps.bus.rpc_timeout_s, tracer=tracer
        )
        runner = StepRunner(
            llm=deps.llm,
            workspace=workspace,
            memory=(
                MemoryClient(deps.broker, event.task_id, deps.bus.rpc_timeout_s)
                if deps.use_memory
                else None
            ),
            model=deps.llm_settings.executor_model or deps.llm_settings.model,
            max_iterations=deps.max_iterations,
            max_tokens=deps.llm_settings.max_tokens,
        )

        async def progress(tool: ToolEvent) -> None:
            await publish_event(
                deps.broker,
                StepToolCalled(
                    task_id=event.task_id,
                    step_id=event.step.id,
                    tool=tool.tool,
                    summary=tool.summary,
                    output=tool.output,
                    outcome=tool.outcome,
                    duration_ms=tool.duration_ms,
                ),
            )

        suffix = "" if event.attempt == 1 else f"#{event.attempt}"
        log.info("step started", attempt=event.attempt)
        attributes = {semconv.TASK_ID: event.task_id, semconv.STEP_ID: event.step.id}
        with tracer.start_as_current_span(
            f"{semconv.SPAN_STEP} {event.step.id}", attributes=attributes
        ):
            async with keep_in_progress(msg, every_s=deps.bus.ack_wait_s / 3):
                result = await runner.run(
                    goal=event.goal,
                    step=event.step,
                    inputs=event.inputs,
                    conversation=f"executor/{event.step.id}{suffix}",
                    task_id=event.task_id,
                    progress=progress,
                )
        if result.ok:
            files: list[str] = []
            if result.touched_workspace:
                try:
                    files = await workspace.file_names()
                except RpcError as exc:
                    log.warning("could not list the workspace", error=str(exc))
            outcome: StepCompleted | StepFailed = StepCompleted(
                event_id=outcome_event_id(event),
                task_id=event.task_id,
                step_id=event.step.id,
                output=result.output[:20_000],
                usage=result.usage,
                workspace_files=files,
                attempt=event.attempt,
                worker=WORKER,
            )
        else:
            outcome = StepFailed(
                event_id=outcome_event_id(event),
                task_id=event.task_id,
                step_id=event.step.id,
                error=result.error[:20_000],
                usage=result.usage,
                attempt=event.attempt,
                worker=WORKER,
            )
        log.info("step finished", ok=result.ok, iterations=result.iterations)
        await publish_event(deps.broker, outcome)
