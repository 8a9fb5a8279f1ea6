"""A batch fetch that runs out of time raises nats.errors.TimeoutError, which FastStream's
batch pull loop handles, never a bare asyncio.TimeoutError, which kills that loop and
strands the messages it had fetched (see agentbus.core.bus)."""

from __future__ import annotations

import nats
import nats.errors
import pytest

import agentbus.core.bus  # noqa: F401 - installs the fix
from agentbus.contracts import new_id

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
