"""Telling JetStream a message is still being worked on (no broker, no FastStream)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


@contextlib.asynccontextmanager
async def keep_in_progress(*messages: Any, every_s: float) -> AsyncIterator[None]:
    """Tell JetStream long handlers are still working on these messages (FastStream or
    nats-py messages: both have ``in_progress``), so they are not redelivered."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            for message in messages:
                with contextlib.suppress(Exception):  # a missed beat only risks a redelivery
                    await message.in_progress()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
