"""The ledger on a real JetStream KV bucket: many callers on separate connections (as
replicas are) race for one task's budget, and the spend never crosses it."""

from __future__ import annotations

import asyncio
import random

import nats
import pytest

from agentbus.contracts import Event, new_id
from agentbus.core.budget import BudgetLedger, BudgetRefused, Ledger, LedgerStatus, Limits, Spend

pytestmark = pytest.mark.integration


async def test_thirty_racing_callers_on_three_connections_never_overshoot(nats_url: str) -> None:
    bucket = f"test_budget_{new_id('b')}"
    task_id = new_id("tsk")
    connections = [await nats.connect(nats_url) for _ in range(3)]
    ledgers = [await BudgetLedger.open(nc.jetstream(), bucket) for nc in connections]
    await ledgers[0].create(Ledger(task_id=task_id, limits=Limits(cost_usd=1.0)))
    published: list[Event] = []
    spent: list[float] = []
    refused: list[str] = []

    async def publish(event: Event) -> None:
        published.append(event)

    async def caller(i: int) -> None:
        rng = random.Random(i)
        for _ in range(5):
            try:
                async with ledgers[i % 3].hold(
                    task_id, Spend(cost_usd=0.1), publish=publish, step_id=f"s{i}", ttl_s=30
                ) as hold:
                    await asyncio.sleep(rng.uniform(0, 0.02))  # the call
                    actual = rng.uniform(0.02, 0.1)  # never more than reserved
                    hold.actual = Spend(cost_usd=actual)
                spent.append(actual)
            except BudgetRefused as exc:
                refused.append(str(exc))
                return

    try:
        await asyncio.gather(*(caller(i) for i in range(30)))
        final = await ledgers[0].load(task_id)
    finally:
        for nc in connections:
            await nc.close()
    assert final is not None
    assert sum(spent) <= 1.0
    assert final.spent.cost_usd == pytest.approx(sum(spent))
    assert final.status is LedgerStatus.PAUSED  # the budget ran out and the task paused
    assert final.reservations == {}
    assert refused  # 150 calls of up to $0.10 could not all fit in $1
    kinds = [e.event_type for e in published]
    assert kinds.count("budget.exhausted") == 1  # one caller paused it; the rest saw it
    assert kinds.count("budget.warning") == 1
