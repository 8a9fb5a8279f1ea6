"""Task deadlines on a real JetStream KV bucket, as two planner replicas see them: each
follows the bucket with a watcher, so the sweep reads no keys and still sees every
replica's deadlines, their changes and their removal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import nats
import pytest

from agentbus.contracts import new_id
from agentbus.planner.adapters.timers import TimerStore
from tests.support import eventually

pytestmark = pytest.mark.integration


async def test_every_replica_sees_the_deadlines_any_replica_sets(nats_url: str) -> None:
    bucket = f"test_timers_{new_id('b')}"
    now = datetime.now(UTC)
    past, future = now - timedelta(seconds=1), now + timedelta(hours=1)
    first, second = await nats.connect(nats_url), await nats.connect(nats_url)
    a = await TimerStore.open(first.jetstream(), bucket)
    await a.set("tsk_old", past)  # set before the other replica starts: loaded, not missed
    b = await TimerStore.open(second.jetstream(), bucket)
    try:

        def due_at(store: TimerStore) -> Callable[[], Awaitable[list[str]]]:
            async def due() -> list[str]:
                return sorted(await store.due(datetime.now(UTC)))

            return due

        assert await b.due(now) == ["tsk_old"]
        await a.set("tsk_new", past)
        await a.set("tsk_later", future)
        await eventually(due_at(b), lambda due: due == ["tsk_new", "tsk_old"], timeout=5)

        await b.set("tsk_old", future)  # approved: its deadline moved on
        await a.set("tsk_new", None)  # ended
        await eventually(due_at(a), lambda due: due == [], timeout=5)
        await eventually(due_at(b), lambda due: due == [], timeout=5)
    finally:
        await a.close()
        await b.close()
        await first.close()
        await second.close()
