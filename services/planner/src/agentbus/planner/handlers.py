"""Planner handlers: parse, call the domain, save state (CAS), publish the outbox."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from faststream.nats import NatsBroker, NatsMessage

from agentbus.contracts import (
    Plan,
    StepCompleted,
    StepFailed,
    TaskCancelRequested,
    TaskSubmitted,
    Usage,
    subjects,
)
from agentbus.core.bus import event_subscriber, keep_in_progress, publish_event
from agentbus.core.llm import ChatRequest, LLMError, LLMProvider, Message
from agentbus.core.settings import BusSettings, LLMSettings

from . import domain
from .adapters.state import TaskStore
from .domain import TaskPhase, TaskState

log = structlog.get_logger(__name__)


@dataclass
class PlannerDeps:
    broker: NatsBroker
    bus: BusSettings
    llm_settings: LLMSettings
    llm: LLMProvider | None = None
    store: TaskStore | None = None

    @property
    def ready_store(self) -> TaskStore:
        if self.store is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("planner state store is not open yet")
        return self.store

    @property
    def ready_llm(self) -> LLMProvider:
        if self.llm is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("planner LLM provider is not built yet")
        return self.llm


async def _publish_outbox(deps: PlannerDeps, state: TaskState | None) -> None:
    if state is None or not state.outbox:
        return
    events = state.pending_events()
    for event in events:
        await publish_event(deps.broker, event)
    sent = {e.event_id for e in events}

    def clear(current: TaskState | None) -> TaskState | None:
        if current is None:
            return None
        current.published(sent)
        return current

    await deps.ready_store.mutate(state.task_id, clear)


async def _ask(
    deps: PlannerDeps, conversation: str, messages: list[Message], task_id: str
) -> tuple[str, Usage]:
    reply = await deps.ready_llm.chat(
        ChatRequest(
            messages=messages,
            model=deps.llm_settings.planner_model or deps.llm_settings.model,
            max_tokens=deps.llm_settings.max_tokens,
            json_output=conversation == "planner/plan",
            conversation=conversation,
            task_id=task_id,
        )
    )
    return reply.message.content or "", Usage.of(reply.model, reply.usage)


async def make_plan(deps: PlannerDeps, event: TaskSubmitted) -> tuple[Plan | None, Usage, str]:
    """Ask for a plan; one repair round with the validation error; (plan, usage, error)."""
    messages = [
        Message(role=r, content=c) for r, c in domain.plan_messages(event.goal, event.budget)
    ]
    usage = Usage()
    error = ""
    for round_no in range(2):
        try:
            text, spent = await _ask(deps, "planner/plan", messages, event.task_id)
        except LLMError as exc:
            return None, usage, f"planning failed: the LLM call failed: {exc}"
        usage = usage + spent
        try:
            return domain.parse_plan(text, event.budget), usage, ""
        except domain.PlanError as exc:
            error = str(exc)
            log.warning("invalid plan from LLM", error=error, round=round_no + 1)
            messages = [
                *messages,
                Message(role="assistant", content=text),
                Message(role="user", content=domain.repair_message(error)),
            ]
    return None, usage, f"planning failed: the LLM gave no valid plan after one repair: {error}"


async def _finish(deps: PlannerDeps, state: TaskState) -> TaskState | None:
    """Write the final answer once every step is done."""
    messages = [Message(role=r, content=c) for r, c in domain.answer_messages(state)]
    try:
        answer, usage = await _ask(deps, "planner/answer", messages, state.task_id)
    except LLMError as exc:
        reason = f"writing the final answer failed: the LLM call failed: {exc}"

        def fail(current: TaskState | None) -> TaskState | None:
            if current is None or current.phase is not TaskPhase.FINISHING:
                return None
            current.fail(reason)
            return current

        return await deps.ready_store.mutate(state.task_id, fail)

    def complete(current: TaskState | None) -> TaskState | None:
        if current is None or current.phase is not TaskPhase.FINISHING:
            return None
        current.complete(answer.strip(), usage)
        return current

    return await deps.ready_store.mutate(state.task_id, complete)


def register(deps: PlannerDeps) -> None:
    """Subscribe the planner's handlers on its broker (durable consumers, shared by replicas)."""
    broker, bus = deps.broker, deps.bus

    @event_subscriber(
        broker,
        TaskSubmitted,
        durable=subjects.planner_durable("task.submitted"),
        settings=bus,
        max_workers=4,
    )
    async def on_submitted(event: TaskSubmitted, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        store = deps.ready_store
        existing = await store.load(event.task_id)
        if existing is not None:  # redelivery: the plan was made; make sure it went out
            await _publish_outbox(deps, existing[0])
            return
        async with keep_in_progress(msg, every_s=bus.ack_wait_s / 3):
            plan, usage, error = await make_plan(deps, event)

        def start(current: TaskState | None) -> TaskState | None:
            if current is not None:
                return None
            if plan is None:
                return domain.failed_before_planning(event, error, usage)
            state = domain.new_state(event)
            state.start(plan, usage)
            state.mark_applied(event)
            return state

        state = await store.mutate(event.task_id, start)
        log.info("planned", steps=len(plan.steps) if plan else 0, error=error or None)
        await _publish_outbox(deps, state)

    @event_subscriber(
        broker,
        StepCompleted,
        durable=subjects.planner_durable("step.completed"),
        settings=bus,
        max_workers=4,
    )
    async def on_step_completed(event: StepCompleted, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)

        def apply(current: TaskState | None) -> TaskState | None:
            if current is None or current.was_applied(event):
                return None
            current.step_completed(event, domain.now())
            current.mark_applied(event)
            return current

        state = await deps.ready_store.mutate(event.task_id, apply)
        if state is None:
            log.warning("step completed for a task this planner does not know")
            return
        if state.phase is TaskPhase.FINISHING:
            async with keep_in_progress(msg, every_s=bus.ack_wait_s / 3):
                state = await _finish(deps, state)
        await _publish_outbox(deps, state)

    @event_subscriber(
        broker,
        StepFailed,
        durable=subjects.planner_durable("step.failed"),
        settings=bus,
        max_workers=4,
    )
    async def on_step_failed(event: StepFailed) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)

        def apply(current: TaskState | None) -> TaskState | None:
            if current is None or current.was_applied(event):
                return None
            current.step_failed(event)
            current.mark_applied(event)
            return current

        await _publish_outbox(deps, await deps.ready_store.mutate(event.task_id, apply))

    @event_subscriber(
        broker,
        TaskCancelRequested,
        durable=subjects.planner_durable("task.cancel_requested"),
        settings=bus,
    )
    async def on_cancel(event: TaskCancelRequested) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)

        def apply(current: TaskState | None) -> TaskState | None:
            if current is None or current.was_applied(event):
                return None
            current.cancel(event.reason)
            current.mark_applied(event)
            return current

        await _publish_outbox(deps, await deps.ready_store.mutate(event.task_id, apply))
