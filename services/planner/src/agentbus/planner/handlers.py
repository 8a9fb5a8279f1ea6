"""Planner handlers: parse, call the domain, save state (CAS), publish the outbox."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from faststream.nats import NatsBroker, NatsMessage

from agentbus.contracts import (
    Event,
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


T = TypeVar("T")


async def ask_with_repair(
    deps: PlannerDeps,
    conversation: str,
    messages: list[Message],
    parse: Callable[[str], T],
    task_id: str,
) -> tuple[T | None, Usage, str]:
    """Ask the LLM; on a reply ``parse`` rejects, one repair round with the error.
    Returns (parsed, usage, error)."""
    usage = Usage()
    error = ""
    for round_no in range(2):
        try:
            text, spent = await _ask(deps, conversation, messages, task_id)
        except LLMError as exc:
            return None, usage, f"the LLM call failed: {exc}"
        usage = usage + spent
        try:
            return parse(text), usage, ""
        except domain.PlanError as exc:
            error = str(exc)
            log.warning("invalid plan from LLM", error=error, round=round_no + 1)
            messages = [
                *messages,
                Message(role="assistant", content=text),
                Message(role="user", content=domain.repair_message(error)),
            ]
    return None, usage, f"the LLM gave no valid plan after one repair: {error}"


async def make_plan(deps: PlannerDeps, event: TaskSubmitted) -> tuple[Plan | None, Usage, str]:
    messages = [
        Message(role=r, content=c) for r, c in domain.plan_messages(event.goal, event.budget)
    ]
    plan, usage, error = await ask_with_repair(
        deps,
        "planner/plan",
        messages,
        lambda text: domain.parse_plan(text, event.budget),
        event.task_id,
    )
    return plan, usage, f"planning failed: {error}" if error else ""


async def _replan(deps: PlannerDeps, state: TaskState) -> TaskState | None:
    """Ask for a new plan for the rest of the work after a step failed."""
    messages = [Message(role=r, content=c) for r, c in domain.replan_messages(state)]
    revision = state.revision
    steps, usage, error = await ask_with_repair(
        deps,
        f"planner/replan-{state.replans + 1}",
        messages,
        lambda text: domain.parse_replan(text, state),
        state.task_id,
    )

    def apply(current: TaskState | None) -> TaskState | None:
        if current is None or current.phase is not TaskPhase.REPLANNING:
            return None
        if current.revision != revision:
            return None  # another replica re-planned first
        if steps is None:
            current.fail(f"{'; '.join(current.failures)}; re-planning failed: {error}", usage)
        else:
            current.replan(steps, usage)
        return current

    return await deps.ready_store.mutate(state.task_id, apply)


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


async def start_task(deps: PlannerDeps, event: TaskSubmitted, msg: NatsMessage) -> None:
    """Plan a new task and dispatch its first steps (idempotent on redelivery)."""
    store = deps.ready_store
    existing = await store.load(event.task_id)
    if existing is not None:  # redelivery: the plan was made; make sure it went out
        await _publish_outbox(deps, existing[0])
        return
    async with keep_in_progress(msg, every_s=deps.bus.ack_wait_s / 3):
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


async def advance(
    deps: PlannerDeps,
    event: Event,
    msg: NatsMessage,
    transition: Callable[[TaskState], None],
) -> None:
    """Apply one event to its task (once), then do what the new phase needs: re-plan
    after a failure, write the answer when every step is done; publish the outbox.

    A redelivered event finds itself applied and just resumes the follow-up, so a
    planner that crashed half-way is finished by whichever replica gets the event."""

    def apply(current: TaskState | None) -> TaskState | None:
        if current is None or current.was_applied(event):
            return None
        transition(current)
        current.mark_applied(event)
        return current

    state = await deps.ready_store.mutate(event.task_id, apply)
    if state is None:
        log.warning("event for a task this planner does not know", event_type=event.event_type)
        return
    async with keep_in_progress(msg, every_s=deps.bus.ack_wait_s / 3):
        if state is not None and state.phase is TaskPhase.REPLANNING:
            state = await _replan(deps, state)
        if state is not None and state.phase is TaskPhase.FINISHING:
            state = await _finish(deps, state)
    await _publish_outbox(deps, state)


def register(deps: PlannerDeps) -> None:
    """Subscribe the planner's handlers on its broker (durable consumers, shared by replicas)."""
    broker, bus = deps.broker, deps.bus

    def durable(event_type: type[Event]) -> Callable[[Any], Any]:
        return event_subscriber(
            broker,
            event_type,
            durable=subjects.planner_durable(event_type.event_type),
            settings=bus,
            max_workers=4,
        )

    @durable(TaskSubmitted)
    async def on_submitted(event: TaskSubmitted, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        await start_task(deps, event, msg)

    @durable(StepCompleted)
    async def on_step_completed(event: StepCompleted, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)
        await advance(deps, event, msg, lambda s: s.step_completed(event, domain.now()))

    @durable(StepFailed)
    async def on_step_failed(event: StepFailed, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)
        await advance(deps, event, msg, lambda s: s.step_failed(event))

    @durable(TaskCancelRequested)
    async def on_cancel(event: TaskCancelRequested, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        await advance(deps, event, msg, lambda s: s.cancel(event.reason))
