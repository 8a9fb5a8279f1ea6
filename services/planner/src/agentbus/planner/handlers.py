"""Planner handlers: parse, call the domain, save state (CAS), publish the outbox.

The planner enforces each task's budgets: it opens the task's ledger (shared with the
executors, who reserve from it before every LLM call), pauses the task when a budget
runs out and resumes it on approval, and watches deadlines (the time budget, the wait
for approval) with a sweeper every replica runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from faststream.nats import NatsBroker, NatsMessage

from agentbus.contracts import (
    BudgetExhausted,
    BudgetKind,
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    TaskApproved,
    TaskCancelRequested,
    TaskSubmitted,
    Usage,
    subjects,
)
from agentbus.core.budget import BudgetLedger, Ledger, LedgerStatus, Limits, Spend
from agentbus.core.bus import event_subscriber, keep_in_progress, publish_event
from agentbus.core.llm import ChatRequest, LLMError, LLMProvider, Message
from agentbus.core.llm.base import BudgetRefused
from agentbus.core.settings import BusSettings, LLMSettings

from . import domain
from .adapters.state import TaskStore
from .adapters.timers import TimerStore
from .config import BudgetDefaults
from .domain import TaskPhase, TaskState

log = structlog.get_logger(__name__)


@dataclass
class PlannerDeps:
    broker: NatsBroker
    bus: BusSettings
    llm_settings: LLMSettings
    defaults: BudgetDefaults = field(default_factory=BudgetDefaults)
    llm: LLMProvider | None = None
    store: TaskStore | None = None
    ledger: BudgetLedger | None = None
    timers: TimerStore | None = None

    @property
    def ready_store(self) -> TaskStore:
        if self.store is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("planner state store is not open yet")
        return self.store

    @property
    def ready_ledger(self) -> BudgetLedger:
        if self.ledger is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("budget ledger is not open yet")
        return self.ledger

    @property
    def ready_timers(self) -> TimerStore:
        if self.timers is None:  # pragma: no cover - set in the start-up hook
            raise RuntimeError("timer store is not open yet")
        return self.timers

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
            model=deps.llm_settings.model_for("planner"),
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
        except BudgetRefused:
            raise  # the task pauses (or has ended): not a failure of planning
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


async def _remaining(deps: PlannerDeps, task_id: str) -> str:
    ledger = await deps.ready_ledger.load(task_id)
    return ledger.describe_remaining() if ledger else ""


async def _plan(deps: PlannerDeps, state: TaskState) -> TaskState | None:
    """Make the first plan and dispatch its first steps."""
    remaining = await _remaining(deps, state.task_id)
    messages = [
        Message(role=r, content=c)
        for r, c in domain.plan_messages(state.goal, state.budget, remaining)
    ]
    plan, usage, error = await ask_with_repair(
        deps,
        "planner/plan",
        messages,
        lambda text: domain.parse_plan(text, state.budget),
        state.task_id,
    )
    log.info("planned", steps=len(plan.steps) if plan else 0, error=error or None)

    def apply(current: TaskState | None) -> TaskState | None:
        if current is None or current.phase is not TaskPhase.PLANNING:
            return None
        if plan is None:
            current.fail(f"planning failed: {error}", usage)
        else:
            current.start(plan, usage)
        return current

    return await deps.ready_store.mutate(state.task_id, apply)


async def _replan(deps: PlannerDeps, state: TaskState) -> TaskState | None:
    """Ask for a new plan for the rest of the work after a step failed."""
    remaining = await _remaining(deps, state.task_id)
    messages = [Message(role=r, content=c) for r, c in domain.replan_messages(state, remaining)]
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
    except BudgetRefused:
        raise  # not a failure: follow_up leaves the task to its approval
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


_WORK = {TaskPhase.PLANNING: _plan, TaskPhase.REPLANNING: _replan, TaskPhase.FINISHING: _finish}


async def follow_up(deps: PlannerDeps, state: TaskState | None, msg: NatsMessage | None) -> None:
    """Do what the task's phase needs (plan, re-plan, write the answer), publish the
    outbox, then look after its budget and deadline. Safe to repeat: a replica that
    crashed half-way is finished by whichever replica gets the event again."""
    beat = keep_in_progress(msg, every_s=deps.bus.ack_wait_s / 3) if msg else None
    async with beat or contextlib.nullcontext():
        while state is not None and state.phase in _WORK:
            phase = state.phase
            try:
                state = await _WORK[phase](deps, state)
            except BudgetRefused:
                break  # paused for approval (BudgetExhausted says so): the approval resumes it
            if state is not None and state.phase is phase:
                break  # no progress here (another replica has it)
    await _publish_outbox(deps, state)
    if state is not None:
        await _watch(deps, state)


async def _watch(deps: PlannerDeps, state: TaskState) -> None:
    """Close the ledger of a finished task; pause a task out of time; keep the task's
    next deadline where the sweeper finds it."""
    now = domain.now()
    if state.terminal:
        await deps.ready_ledger.close(state.task_id, f"the task has {state.phase.value}")
    elif state.over_time(now):
        limit = state.budget.max_wall_seconds
        elapsed = state.elapsed_s(now)
        flipped, ledger = await deps.ready_ledger.pause(
            state.task_id,
            BudgetKind.TIME,
            elapsed,
            limit,
            f"time budget exhausted: {elapsed:.0f} s of {limit:.0f} s",
        )
        if flipped and ledger is not None:
            await publish_event(deps.broker, ledger.exhausted_event(now))
    await deps.ready_timers.set(state.task_id, state.next_deadline())


async def start_task(deps: PlannerDeps, event: TaskSubmitted, msg: NatsMessage) -> None:
    """Open the task's ledger, plan it and dispatch its first steps (idempotent)."""
    budget = deps.defaults.apply(event.budget)
    await deps.ready_ledger.create(
        Ledger(
            task_id=event.task_id,
            limits=Limits.of(budget),
            policy=budget.on_exhausted or deps.defaults.on_exhausted,
            approval_timeout_s=budget.approval_timeout_s or deps.defaults.approval_timeout_s,
        )
    )

    def create(current: TaskState | None) -> TaskState | None:
        if current is not None:
            return None
        state = domain.new_state(event, budget)
        state.mark_applied(event)
        return state

    state = await deps.ready_store.mutate(event.task_id, create)
    await follow_up(deps, state, msg)


async def advance(
    deps: PlannerDeps,
    event: Event,
    msg: NatsMessage,
    transition: Callable[[TaskState], None],
) -> None:
    """Apply one event to its task (once), then do what the new phase needs."""

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
    await follow_up(deps, state, msg)


async def approve(deps: PlannerDeps, event: TaskApproved, msg: NatsMessage) -> None:
    """More budget in the ledger first (once per approval), then resume the task."""
    add = Spend(
        cost_usd=event.add_cost_usd,
        tokens=event.add_tokens,
        llm_calls=event.add_llm_calls,
        sandbox_cpu=event.add_sandbox_cpu_seconds,
    )
    await deps.ready_ledger.approve(event.task_id, event.event_id, add)
    log.info("approved", approved_by=event.approved_by, add_cost_usd=event.add_cost_usd)
    await advance(deps, event, msg, lambda s: s.approved(event, domain.now()))


async def settle_pause(deps: PlannerDeps, task_id: str) -> None:
    """After a step paused, look at the ledger: open again (approved meanwhile) means
    the paused steps go on now; paused means the task must await approval, so make sure
    the ledger's ``BudgetExhausted`` is out (the caller that paused it may have crashed
    before publishing it; the id is deterministic, so a repeat is dropped)."""
    ledger = await deps.ready_ledger.load(task_id)
    if ledger is None:
        return
    if ledger.status is LedgerStatus.PAUSED and ledger.exhausted is not None:
        await publish_event(deps.broker, ledger.exhausted_event(domain.now()))
    elif ledger.status is LedgerStatus.OPEN:

        def resume(current: TaskState | None) -> TaskState | None:
            if current is None or not current.has_paused_steps():
                return None
            current.resume_paused()
            return current if current.outbox else None

        state = await deps.ready_store.mutate(task_id, resume)
        await _publish_outbox(deps, state)


async def sweep(deps: PlannerDeps) -> None:
    """Act on passed deadlines: fail tasks whose wait for approval timed out, pause
    tasks out of time. Every replica sweeps; compare-and-set keeps it to one effect."""
    now = domain.now()
    for task_id in await deps.ready_timers.due(now):
        structlog.contextvars.bind_contextvars(task_id=task_id)

        def timeout(current: TaskState | None) -> TaskState | None:
            if current is None or current.phase is not TaskPhase.AWAITING_APPROVAL:
                return None
            current.approval_timed_out(now)
            return current if current.terminal else None

        state = await deps.ready_store.mutate(task_id, timeout)
        if state is None:
            await deps.ready_timers.set(task_id, None)
            continue
        await _publish_outbox(deps, state)
        await _watch(deps, state)
    structlog.contextvars.unbind_contextvars("task_id")


class Sweeper:
    """Runs :func:`sweep` every ``interval_s`` until stopped."""

    def __init__(self, deps: PlannerDeps, interval_s: float) -> None:
        self.deps = deps
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="planner-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await sweep(self.deps)
            except Exception:  # a failed sweep is tried again at the next tick
                log.exception("deadline sweep failed")


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
        await advance(deps, event, msg, lambda s: s.step_completed(event))

    @durable(StepFailed)
    async def on_step_failed(event: StepFailed, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)
        await advance(deps, event, msg, lambda s: s.step_failed(event))

    @durable(StepPaused)
    async def on_step_paused(event: StepPaused, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id, step_id=event.step_id)
        await advance(deps, event, msg, lambda s: s.step_paused(event))
        await settle_pause(deps, event.task_id)

    @durable(BudgetExhausted)
    async def on_budget_exhausted(event: BudgetExhausted, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        log.warning("budget exhausted", reason=event.reason, action=event.action.value)
        await advance(deps, event, msg, lambda s: s.budget_exhausted(event, domain.now()))

    @durable(TaskApproved)
    async def on_approved(event: TaskApproved, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        await approve(deps, event, msg)

    @durable(TaskCancelRequested)
    async def on_cancel(event: TaskCancelRequested, msg: NatsMessage) -> None:
        structlog.contextvars.bind_contextvars(task_id=event.task_id)
        await advance(deps, event, msg, lambda s: s.cancel(event.reason))
