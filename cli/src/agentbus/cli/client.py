"""Talking to a running agentbus: submit, follow, query, over NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
from faststream.nats import NatsBroker
from nats.js.api import DeliverPolicy
from opentelemetry.trace import TracerProvider

from agentbus.contracts import (
    TERMINAL_EVENT_TYPES,
    Event,
    TaskHistoryReply,
    TaskHistoryRequest,
    parse_event,
    subjects,
)
from agentbus.core.bus import create_broker, ensure_streams, jetstream, publish_event, rpc
from agentbus.core.settings import BusSettings


@contextlib.asynccontextmanager
async def connect(
    nats_url: str, tracer_provider: TracerProvider | None = None
) -> AsyncIterator[NatsBroker]:
    settings = BusSettings(nats_url=nats_url)
    broker = create_broker("cli", settings, tracer_provider=tracer_provider)
    await broker.connect()
    try:
        await ensure_streams(jetstream(broker), settings)
        yield broker
    finally:
        await broker.stop()


async def follow(broker: NatsBroker, task_id: str, *, timeout: float) -> AsyncIterator[Event]:
    """Every event of one task from the start, live, until a terminal event or timeout.

    An ordered JetStream consumer replays what was published before we subscribed, so
    nothing is missed however fast the services are."""
    js = jetstream(broker)
    sub = await js.subscribe(
        subjects.task_filter(task_id), ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no end of task {task_id} within {timeout:g}s")
            try:
                msg = await sub.next_msg(timeout=min(remaining, 1.0))
            except nats.errors.TimeoutError:
                continue
            try:
                event = parse_event(msg.data)
            except ValueError:
                continue  # not ours to judge here; memory keeps it and the DLQ has it
            yield event
            if event.event_type in TERMINAL_EVENT_TYPES:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def submit(broker: NatsBroker, event: Event) -> None:
    await publish_event(broker, event)


async def history(broker: NatsBroker, task_id: str, timeout: float = 10) -> TaskHistoryReply:
    return await rpc(
        broker,
        subjects.MEMORY_TASK_HISTORY,
        TaskHistoryRequest(task_id=task_id),
        TaskHistoryReply,
        timeout=timeout,
    )
