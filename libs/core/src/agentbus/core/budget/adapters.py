"""The ledgers of all tasks in their JetStream KV bucket (``subjects.BUDGET_LEDGER_BUCKET``,
records ``contracts.LedgerRecord``), changed with compare-and-set: shared by every
replica of the planner and the executor, and it survives restarts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from nats.js import JetStreamContext

from agentbus.contracts import (
    BudgetFigure,
    BudgetKind,
    LedgerStatus,
    Spend,
    new_id,
    subjects,
    utcnow,
)

from ..kv import CasStore, open_bucket
from .domain import BudgetRefused, Decision, Hold, Ledger, Publish, Verdict


class BudgetLedger:
    """The ledgers of all tasks in a JetStream KV bucket."""

    def __init__(self, store: CasStore[Ledger]) -> None:
        self.store = store

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.BUDGET_LEDGER_BUCKET
    ) -> BudgetLedger:
        return cls(CasStore(await open_bucket(js, bucket), Ledger))

    async def load(self, task_id: str) -> Ledger | None:
        found = await self.store.load(task_id)
        return found[0] if found else None

    async def create(self, ledger: Ledger) -> Ledger:
        """Create the task's ledger unless it exists; returns the stored one."""
        stored = await self.store.mutate(ledger.task_id, lambda cur: None if cur else ledger)
        return stored or ledger

    async def reserve(
        self, task_id: str, rid: str, want: Spend, *, step_id: str = "", ttl_s: float
    ) -> tuple[Decision, Ledger | None]:
        """Reserve ``want`` for ``rid``. While other callers' reservations hold the budget
        it waits for them to settle; that wait is bounded, since a reservation lapses
        after ``ttl_s``. A task with no ledger is not budgeted: granted."""
        holder: list[Decision] = []

        def change(current: Ledger | None) -> Ledger | None:
            holder.clear()
            if current is None:
                holder.append(Decision(Verdict.GRANTED))
                return None
            holder.append(current.try_reserve(rid, want, step_id, time.time(), ttl_s))
            granted = holder[0].verdict is Verdict.GRANTED
            return current if granted or holder[0].flipped else None

        pause = 0.02
        while True:
            ledger = await self.store.mutate(task_id, change)
            if holder[0].verdict is not Verdict.WAIT:
                return holder[0], ledger
            await asyncio.sleep(pause)
            pause = min(0.25, pause * 2)

    @contextlib.asynccontextmanager
    async def hold(
        self,
        task_id: str,
        want: Spend,
        *,
        publish: Publish,
        step_id: str = "",
        ttl_s: float,
    ) -> AsyncIterator[Hold]:
        """Reserve ``want`` for the block; settle to ``hold.actual`` when it ends, or give
        the reservation back if it raises. Raises :class:`BudgetRefused` (after
        publishing ``BudgetExhausted`` if this call paused the task) when refused, and
        publishes ``BudgetWarning`` for budgets the spend pushes past 80%."""
        rid = new_id("rsv")
        decision, ledger = await self.reserve(task_id, rid, want, step_id=step_id, ttl_s=ttl_s)
        if decision.verdict is not Verdict.GRANTED:
            if decision.flipped and ledger is not None:
                await publish(ledger.exhausted_event(utcnow()))
            raise BudgetRefused(decision.reason, closed=decision.verdict is Verdict.CLOSED)
        hold = Hold(want)
        try:
            yield hold
        except BaseException:
            await asyncio.shield(self.release(task_id, rid))
            raise
        crossed, ledger = await self.settle(task_id, rid, hold.actual)
        if ledger is not None:
            for figure in crossed:
                await publish(ledger.warning_event(figure))

    async def settle(
        self, task_id: str, rid: str, actual: Spend
    ) -> tuple[list[BudgetFigure], Ledger | None]:
        crossed: list[BudgetFigure] = []

        def change(current: Ledger | None) -> Ledger | None:
            crossed.clear()
            if current is None:
                return None
            crossed.extend(current.settle(rid, actual))
            return current

        ledger = await self.store.mutate(task_id, change)
        return crossed, ledger

    async def release(self, task_id: str, rid: str) -> None:
        def change(current: Ledger | None) -> Ledger | None:
            if current is None or rid not in current.reservations:
                return None
            current.release(rid)
            return current

        await self.store.mutate(task_id, change)

    async def approve(self, task_id: str, approval_id: str, add: Spend) -> Ledger | None:
        def change(current: Ledger | None) -> Ledger | None:
            return current if current is not None and current.approve(approval_id, add) else None

        return await self.store.mutate(task_id, change)

    async def pause(
        self, task_id: str, kind: BudgetKind, used: float, limit: float, reason: str
    ) -> tuple[bool, Ledger | None]:
        flipped: list[bool] = []

        def change(current: Ledger | None) -> Ledger | None:
            flipped.clear()
            flipped.append(current is not None and current.pause(kind, used, limit, reason))
            return current if flipped[0] else None

        ledger = await self.store.mutate(task_id, change)
        return bool(flipped and flipped[0]), ledger

    async def close(self, task_id: str, reason: str) -> None:
        def change(current: Ledger | None) -> Ledger | None:
            if current is None or current.status is LedgerStatus.CLOSED:
                return None
            current.close(reason)
            return current

        await self.store.mutate(task_id, change)
