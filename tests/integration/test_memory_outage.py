"""Memory survives its database going away: Postgres is stopped while events arrive and
started again; every event is stored once, none is dead-lettered.

Runs against a Postgres of its own (it is stopped mid-test) and a durable consumer of
its own on the shared nats-server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import asyncpg
import numpy as np
import pytest
from faststream import TestApp
from faststream.nats import NatsBroker
from nats.js.api import ConsumerInfo

from agentbus.cli import client
from agentbus.cli.stack import Postgres
from agentbus.contracts import (
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepReady,
    TaskCompleted,
    TaskSubmitted,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream, publish_event
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, create_app
from agentbus.memory.adapters.embeddings import Vector
from tests.support import dead_letters, eventually

pytestmark = pytest.mark.integration


class NoModel:
    """This test stores events only; it needs no embedding model."""

    name = "none"
    dimension = 4
    texts_embedded = 0

    async def start(self) -> None:
        return None

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        return [np.ones(4, dtype=np.float32) for _ in texts]

    async def close(self) -> None:
        return None


@pytest.fixture
async def own_postgres(tmp_root: Path) -> AsyncIterator[Postgres]:
    pg = Postgres(tmp_root / f"pg-outage-{uuid.uuid4().hex[:6]}").start()
    yield pg
    pg.stop()


async def stored_events(url: str, task_id: str) -> list[str]:
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError):
        return []
    try:
        rows = await conn.fetch(
            "SELECT type FROM events WHERE task_id = $1 ORDER BY stream_seq", task_id
        )
    finally:
        await conn.close()
    return [r["type"] for r in rows]


async def test_events_published_while_postgres_is_down_are_stored_once_it_is_back(
    nats_url: str, own_postgres: Postgres
) -> None:
    url = own_postgres.url
    durable = f"memory-outage-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=url,
        events_durable=durable,
        outage_backoff_s=0.05,
        outage_backoff_max_s=0.3,
        # Two deliveries only: were the outage counted per attempt, the events would be
        # dead-lettered within a second.
        bus=BusSettings(nats_url=nats_url, max_deliver=2, retry_backoff_s=0.05, ack_wait_s=2),
    )
    task_id = new_id("tsk")
    step = PlanStep(id="s1", title="one", instructions="do it")
    submitted = TaskSubmitted(task_id=task_id, goal="survive a restart")
    during = [
        PlanCreated(task_id=task_id, steps=[step]),
        StepReady(task_id=task_id, step=step, goal=submitted.goal),
        StepCompleted(task_id=task_id, step_id="s1", output="ok"),
        TaskCompleted(task_id=task_id, answer="done"),
    ]
    app = create_app(settings, embedder=NoModel())
    async with TestApp(app), client.connect(nats_url) as broker:
        await publish_event(broker, submitted)
        await eventually(lambda: stored_events(url, task_id), lambda t: t == ["task.submitted"])

        await asyncio.to_thread(own_postgres.stop)
        for event in during:
            await publish_event(broker, event)
        await asyncio.sleep(4)  # retries, two ack_wait periods: longer than max_deliver allows
        info = await _consumer(broker, durable)
        # Held, neither acked nor given up: the batch being stored is in progress, and
        # whatever it did not take is still waiting in the stream behind it.
        held, waiting = info.num_ack_pending or 0, info.num_pending or 0
        assert held >= 1
        assert held + waiting == len(during)

        await asyncio.to_thread(own_postgres.start)
        assert own_postgres.url == url
        types = await eventually(
            lambda: stored_events(url, task_id), lambda t: len(t) == 5, timeout=30
        )
        assert types == ["task.submitted", *(e.event_type for e in during)]

        js = jetstream(broker)
        for event in during:
            assert await dead_letters(js, "memory", event.subject) == []
        conn = await asyncpg.connect(url)
        try:
            status = await conn.fetchval("SELECT status FROM tasks WHERE task_id = $1", task_id)
        finally:
            await conn.close()
        assert status == "completed"
        await eventually(lambda: _consumer(broker, durable), lambda i: i.num_ack_pending == 0)
        await js.delete_consumer(subjects.EVENTS_STREAM, durable)


async def _consumer(broker: NatsBroker, durable: str) -> ConsumerInfo:
    js = jetstream(broker)
    return await js.consumer_info(subjects.EVENTS_STREAM, durable)


async def test_events_are_stored_after_the_database_drops_every_connection(
    nats_url: str, own_postgres: Postgres
) -> None:
    url = own_postgres.url
    durable = f"memory-drop-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=url,
        events_durable=durable,
        pool_min_size=2,
        outage_backoff_s=0.05,
        bus=BusSettings(nats_url=nats_url, max_deliver=2, retry_backoff_s=0.05),
    )
    task_id = new_id("tsk")
    app = create_app(settings, embedder=NoModel())
    async with TestApp(app), client.connect(nats_url) as broker:
        await publish_event(broker, TaskSubmitted(task_id=task_id, goal="drop"))
        await eventually(lambda: stored_events(url, task_id), lambda t: len(t) == 1)
        admin = await asyncpg.connect(url)
        try:
            dropped = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        finally:
            await admin.close()
        assert dropped >= 1  # memory's pooled connections are gone
        await publish_event(broker, TaskCompleted(task_id=task_id, answer="still here"))
        types = await eventually(lambda: stored_events(url, task_id), lambda t: len(t) == 2)
        assert types == ["task.submitted", "task.completed"]
        js = jetstream(broker)
        subject = subjects.event_subject(task_id, "task.completed")
        assert await dead_letters(js, "memory", subject) == []
        await js.delete_consumer(subjects.EVENTS_STREAM, durable)
