"""A batch fetch that runs out of time raises nats.errors.TimeoutError, which FastStream's
batch pull loop handles, never a bare asyncio.TimeoutError, which kills that loop and
strands the messages it had fetched (see agentbus.core.bus)."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from faststream.nats import NatsBroker

from agentbus.contracts import new_id, subjects
from agentbus.core.bus import durable_subscriber, ensure_streams
from agentbus.core.settings import BusSettings

pytestmark = pytest.mark.integration


async def test_batch_fetch_timeouts_are_nats_timeouts(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    stream = new_id("S").upper()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    sub = await js.pull_subscribe(f"{stream}.>", durable="d", stream=stream)
    kinds = set()
    try:
        for i in range(200):  # tiny deadlines reach every timeout path of _fetch_n
            if i % 3 == 0:
                await js.publish(f"{stream}.x", b"m")
            try:
                for msg in await sub.fetch(batch=10, timeout=0.0005 * (i % 7 + 1)):
                    await msg.ack()
            except TimeoutError as exc:
                kinds.add(type(exc))
    finally:
        await js.delete_stream(stream)
        await nc.close()
    assert kinds == {nats.errors.TimeoutError}


async def test_events_published_together_are_handled_together(nats_url: str) -> None:
    """Two steps made ready at once run at once. nats-py's batch fetch, once it has one
    message, waits for the rest of the batch until its deadline (5 s) before returning
    any, so a consumer that fetched in batches sat on the first message, or the second,
    for seconds (parallel steps started up to 5 s apart)."""
    settings = BusSettings(nats_url=nats_url)
    broker = NatsBroker(nats_url)
    task = new_id("tsk")
    started: list[str] = []
    both = asyncio.Event()

    @durable_subscriber(
        broker,
        f"agentbus.tasks.{task}.>",
        durable=new_id("together"),
        settings=settings,
        max_workers=4,
    )
    async def handle(body: dict[str, str]) -> None:
        started.append(body["step"])
        if len(started) == 2:
            both.set()
        # the first holds on until the second has started (bounded: the test fails first)
        await asyncio.wait_for(both.wait(), timeout=10)

    async with broker:
        await ensure_streams(broker.config.connection_state.stream, settings)
        await broker.start()
        for step in ("s1", "s2"):
            await broker.publish(
                {"step": step}, f"agentbus.tasks.{task}.step.ready", stream=subjects.EVENTS_STREAM
            )
        try:
            await asyncio.wait_for(both.wait(), timeout=2.5)  # the fetch window is 5 s
        except TimeoutError:
            pytest.fail(f"only {started} started; the other was held back by the fetch")
