"""A batch fetch that runs out of time raises nats.errors.TimeoutError, which FastStream's
batch pull loop handles, never a bare asyncio.TimeoutError, which kills that loop and
strands the messages it had fetched (see agentbus.core.bus)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import nats.errors
import pytest
from faststream.nats import NatsBroker
from nats.js.client import JetStreamContext

from agentbus.contracts import new_id, subjects
from agentbus.core._nats_fixes import ORIGINAL_FETCH, apply_nats_fixes
from agentbus.core.bus import durable_subscriber, ensure_streams, jetstream
from agentbus.core.settings import BusSettings

pytestmark = pytest.mark.integration


async def _fetch_timeout_kinds(nats_url: str, fetch: Any, rounds: int) -> set[type]:
    """The kinds of TimeoutError ``fetch(sub, batch=, timeout=)`` raises over ``rounds``
    fetches with tiny deadlines (which reach every timeout path of nats-py's _fetch_n)."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    js = nc.jetstream()
    stream = new_id("S").upper()
    await js.add_stream(name=stream, subjects=[f"{stream}.>"])
    sub = await js.pull_subscribe(f"{stream}.>", durable="d", stream=stream)
    kinds = set()
    try:
        for i in range(rounds):
            if i % 3 == 0:
                await js.publish(f"{stream}.x", b"m", timeout=5)
            try:
                for msg in await fetch(sub, batch=10, timeout=0.0005 * (i % 7 + 1)):
                    await msg.ack()
            except TimeoutError as exc:
                kinds.add(type(exc))
    finally:
        await js.delete_stream(stream)
        await nc.close()
    return kinds


async def test_batch_fetch_timeouts_are_nats_timeouts(nats_url: str) -> None:
    apply_nats_fixes()
    kinds = await _fetch_timeout_kinds(nats_url, JetStreamContext.PullSubscription.fetch, 200)
    assert kinds == {nats.errors.TimeoutError}


async def test_upstream_nats_py_still_needs_the_fetch_workaround(nats_url: str) -> None:
    """Canary: nats-py's own fetch still raises a bare TimeoutError now and then (6 in
    200 fetches when this was written; 600 make a miss a one-in-millions event). When
    this fails, upstream is fixed: delete the workaround in agentbus.core._nats_fixes."""
    kinds = await _fetch_timeout_kinds(nats_url, ORIGINAL_FETCH, 600)
    assert TimeoutError in kinds, (
        "nats-py no longer raises a bare asyncio.TimeoutError from fetch: "
        "remove the workaround in agentbus.core._nats_fixes"
    )


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
        await ensure_streams(jetstream(broker), settings)
        await broker.start()
        for step in ("s1", "s2"):
            await broker.publish(
                {"step": step}, f"agentbus.tasks.{task}.step.ready", stream=subjects.EVENTS_STREAM
            )
        try:
            await asyncio.wait_for(both.wait(), timeout=2.5)  # the fetch window is 5 s
        except TimeoutError:
            pytest.fail(f"only {started} started; the other was held back by the fetch")
