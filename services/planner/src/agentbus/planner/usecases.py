"""The planner's use cases: what happens when an event arrives or a deadline passes.

Each one loads the task's state, applies a domain transition, saves it (compare-and-set)
and then publishes the outbox, so a replica that crashed half-way is finished by
whichever replica gets the event again.

The planner enforces each task's budgets: it opens the task's ledger (shared with the
executors, who reserve from it before every LLM call), pauses the task when a budget
runs out and resumes it on approval, and watches deadlines (the time budget, the wait
for approval) with a sweeper every replica runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from agentbus.contracts import (
    BudgetExhausted,
    BudgetKind,
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    TaskApproved,
    TaskCancelRequested,
    TaskStatus,
    TaskSubmitted,
    Usage,
)
from agentbus.core.budget import BudgetRefused, Ledger, LedgerStatus, Limits, Spend
from agentbus.core.llm import ChatRequest, LLMError, Message

from . import domain
from .config import BudgetDefaults
from .domain import TaskState
from .ports import LedgerPort, LLMProvider, Publisher, TaskStates, Timers

log = structlog.get_logger(__name__)

T = TypeVar("T")
Work = Callable[["Planner", TaskState], Awaitable[TaskState | None]]


@dataclass
class Planner:
    """The planner's use cases over its ports."""

    states: TaskStates
    timers: Timers
    ledger: LedgerPort
    llm: LLMProvider
    publisher: Publisher
    model: str | None
    max_tokens: int
    defaults: BudgetDefaults

    # --- events ----------------------------------------------------------------------

    async def submitted(self, event: TaskSubmitted) -> None:
        """Open the task's ledger, plan it and dispatch its first steps (idempotent)."""
        budget = self.defaults.apply(event.budget)
        await self.ledger.create(
            Ledger(
                task_id=event.task_id,
                limits=Limits.of(budget),
                policy=budget.on_exhausted or self.defaults.on_exhausted,
                approval_timeout_s=budget.approval_timeout_s or self.defaults.approval_timeout_s,
            )
        )

        def create(current: TaskState | None) -> TaskState | None:
            if current is not None:
                return None
            state = domain.new_state(event, budget)
            state.mark_applied(event)
            return state

        state = await self.states.mutate(event.task_id, create)
        await self._follow_up(state)

    async def step_completed(self, event: StepCompleted) -> None:
        await self._advance(event, lambda s: s.step_completed(event))

    async def step_failed(self, event: StepFailed) -> None:
        await self._advance(event, lambda s: s.step_failed(event))

    async def step_paused(self, event: StepPaused) -> None:
        await self._advance(event, lambda s: s.step_paused(event))
        await self._settle_pause(event.task_id)

    async def budget_exhausted(self, event: BudgetExhausted) -> None:
        log.warning("budget exhausted", reason=event.reason, action=event.action.value)
        await self._advance(event, lambda s: s.budget_exhausted(event, domain.now()))

    async def approved(self, event: TaskApproved) -> None:
        """More budget in the ledger first (once per approval), then resume the task."""
        add = Spend(
            cost_usd=event.add_cost_usd,
            tokens=event.add_tokens,
            llm_calls=event.add_llm_calls,
            sandbox_cpu=event.add_sandbox_cpu_seconds,
        )
        await self.ledger.approve(event.task_id, event.event_id, add)
        log.info("approved", approved_by=event.approved_by, add_cost_usd=event.add_cost_usd)
        await self._advance(event, lambda s: s.approved(event, domain.now()))

    async def cancel_requested(self, event: TaskCancelRequested) -> None:
        await self._advance(event, lambda s: s.cancel(event.reason))

    # --- deadlines -------------------------------------------------------------------

    async def sweep(self) -> None:
        """Act on passed deadlines: fail tasks whose wait for approval timed out, pause
        tasks out of time. Every replica sweeps; compare-and-set keeps it to one effect."""
        now = domain.now()
        for task_id in await self.timers.due(now):
            structlog.contextvars.bind_contextvars(task_id=task_id)

            def timeout(current: TaskState | None) -> TaskState | None:
                if current is None or current.phase is not TaskStatus.AWAITING_APPROVAL:
                    return None
                current.approval_timed_out(now)
                return current if current.terminal else None

            state = await self.states.mutate(task_id, timeout)
            if state is None:
                await self.timers.set(task_id, None)
                continue
            await self._publish_outbox(state)
            await self._watch(state)
        structlog.contextvars.unbind_contextvars("task_id")

    # --- the steps every use case shares ---------------------------------------------

    async def _advance(self, event: Event, transition: Callable[[TaskState], None]) -> None:
        """Apply one event to its task (once), then do what the new phase needs."""

        def apply(current: TaskState | None) -> TaskState | None:
            if current is None or current.was_applied(event):
                return None
            transition(current)
            current.mark_applied(event)
            return current

        state = await self.states.mutate(event.task_id, apply)
        if state is None:
            log.warning("event for a task this planner does not know", event_type=event.event_type)
            return
        await self._follow_up(state)

    async def _follow_up(self, state: TaskState | None) -> None:
        """Do what the task's phase needs (plan, re-plan, write the answer), publish the
        outbox, then look after its budget and deadline. Safe to repeat."""
        while state is not None and state.phase in _WORK:
            phase = state.phase
            try:
                state = await _WORK[phase](self, state)
            except BudgetRefused:
                break  # paused for approval (BudgetExhausted says so): the approval resumes it
            if state is not None and state.phase is phase:
                break  # no progress here (another replica has it)
        await self._publish_outbox(state)
        if state is not None:
            await self._watch(state)

    async def _publish_outbox(self, state: TaskState | None) -> None:
        if state is None or not state.outbox:
            return
        events = state.pending_events()
        for event in events:
            await self.publisher.publish(event)
        sent = {e.event_id for e in events}

        def clear(current: TaskState | None) -> TaskState | None:
            if current is None:
                return None
            current.published(sent)
            return current

        await self.states.mutate(state.task_id, clear)

    async def _watch(self, state: TaskState) -> None:
        """Close the ledger of a finished task; pause a task out of time; keep the task's
        next deadline where the sweeper finds it."""
        now = domain.now()
        if state.terminal:
            await self.ledger.close(state.task_id, f"the task has {state.phase.value}")
        elif state.over_time(now):
            limit = state.budget.max_wall_seconds
            elapsed = state.elapsed_s(now)
            flipped, ledger = await self.ledger.pause(
                state.task_id,
                BudgetKind.TIME,
                elapsed,
                limit,
                f"time budget exhausted: {elapsed:.0f} s of {limit:.0f} s",
            )
            if flipped and ledger is not None:
                await self.publisher.publish(ledger.exhausted_event(now))
        await self.timers.set(state.task_id, state.next_deadline())

    async def _settle_pause(self, task_id: str) -> None:
        """After a step paused, look at the ledger: open again (approved meanwhile) means
        the paused steps go on now; paused means the task must await approval, so make sure
        the ledger's ``BudgetExhausted`` is out (the caller that paused it may have crashed
        before publishing it; the id is deterministic, so a repeat is dropped)."""
        ledger = await self.ledger.load(task_id)
        if ledger is None:
            return
        if ledger.status is LedgerStatus.PAUSED and ledger.exhausted is not None:
            await self.publisher.publish(ledger.exhausted_event(domain.now()))
        elif ledger.status is LedgerStatus.OPEN:

            def resume(current: TaskState | None) -> TaskState | None:
                if current is None or not current.has_paused_steps():
                    return None
                current.resume_paused()
                return current if current.outbox else None

            state = await self.states.mutate(task_id, resume)
            await self._publish_outbox(state)

    # --- the LLM work of a phase -----------------------------------------------------

    async def _ask(
        self, conversation: str, messages: list[Message], task_id: str
    ) -> tuple[str, Usage]:
        reply = await self.llm.chat(
            ChatRequest(
                messages=messages,
                model=self.model,
                max_tokens=self.max_tokens,
                json_output=conversation == "planner/plan",
                conversation=conversation,
                task_id=task_id,
            )
        )
        return reply.message.content or "", Usage.of(reply.model, reply.usage)

    async def _ask_with_repair(
        self,
        conversation: str,
        messages: list[Message],
        parse: Callable[[str], T],
        task_id: str,
    ) -> tuple[T | None, Usage, str]:
        """Ask the LLM; on a reply ``parse`` rejects, one repair round with the error.
        Returns (parsed, usage, error). A refused budget raises: the task pauses (or has
        ended), which is not a failure of planning."""
        usage = Usage()
        error = ""
        for round_no in range(2):
            try:
                text, spent = await self._ask(conversation, messages, task_id)
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

    async def _remaining(self, task_id: str) -> str:
        ledger = await self.ledger.load(task_id)
        return ledger.describe_remaining() if ledger else ""

    async def _plan(self, state: TaskState) -> TaskState | None:
        """Make the first plan and dispatch its first steps."""
        remaining = await self._remaining(state.task_id)
        messages = [
            Message(role=r, content=c)
            for r, c in domain.plan_messages(state.goal, state.budget, remaining)
        ]
        plan, usage, error = await self._ask_with_repair(
            "planner/plan",
            messages,
            lambda text: domain.parse_plan(text, state.budget),
            state.task_id,
        )
        log.info("planned", steps=len(plan.steps) if plan else 0, error=error or None)

        def apply(current: TaskState) -> None:
            if plan is None:
                current.fail(f"planning failed: {error}", usage)
            else:
                current.start(plan, usage)

        return await self._while_in(TaskStatus.PLANNING, state.task_id, apply)

    async def _replan(self, state: TaskState) -> TaskState | None:
        """Ask for a new plan for the rest of the work after a step failed."""
        remaining = await self._remaining(state.task_id)
        messages = [Message(role=r, content=c) for r, c in domain.replan_messages(state, remaining)]
        revision = state.revision
        steps, usage, error = await self._ask_with_repair(
            f"planner/replan-{state.replans + 1}",
            messages,
            lambda text: domain.parse_replan(text, state),
            state.task_id,
        )

        def apply(current: TaskState) -> bool:
            if current.revision != revision:
                return False  # another replica re-planned first
            if steps is None:
                current.fail(f"{'; '.join(current.failures)}; re-planning failed: {error}", usage)
            else:
                current.replan(steps, usage)
            return True

        return await self._while_in(TaskStatus.REPLANNING, state.task_id, apply)

    async def _finish(self, state: TaskState) -> TaskState | None:
        """Write the final answer once every step is done. A refused budget raises: the
        task is left to its approval."""
        messages = [Message(role=r, content=c) for r, c in domain.answer_messages(state)]
        try:
            answer, usage = await self._ask("planner/answer", messages, state.task_id)
        except LLMError as exc:
            reason = f"writing the final answer failed: the LLM call failed: {exc}"
            return await self._while_in(
                TaskStatus.FINISHING, state.task_id, lambda s: s.fail(reason)
            )
        final = answer.strip()
        return await self._while_in(
            TaskStatus.FINISHING, state.task_id, lambda s: s.complete(final, usage)
        )

    async def _while_in(
        self, phase: TaskStatus, task_id: str, change: Callable[[TaskState], bool | None]
    ) -> TaskState | None:
        """Apply the result of a phase's LLM work if the task is still in that phase
        (another replica, or an event meanwhile, may have moved it on); ``change``
        returns False to leave it as it is."""

        def apply(current: TaskState | None) -> TaskState | None:
            if current is None or current.phase is not phase or change(current) is False:
                return None
            return current

        return await self.states.mutate(task_id, apply)


_WORK: dict[TaskStatus, Work] = {
    TaskStatus.PLANNING: Planner._plan,
    TaskStatus.REPLANNING: Planner._replan,
    TaskStatus.FINISHING: Planner._finish,
}


class Sweeper:
    """Runs ``sweep`` every ``interval_s`` until stopped."""

    def __init__(self, sweep: Callable[[], Awaitable[None]], interval_s: float) -> None:
        self.sweep = sweep
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
                await self.sweep()
            except Exception:  # a failed sweep is tried again at the next tick
                log.exception("deadline sweep failed")
