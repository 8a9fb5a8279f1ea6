"""The workspace guard: watches a workspace's disk usage while code runs and stops a
run that grows it past the cap (the caller's ``stop`` replaces the container; the
files are kept). Usage is walked on the host (:func:`.workspace.disk_usage`), never
following anything agent code made."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


async def guarded(
    running: Awaitable[T],
    *,
    cap: int,
    interval_s: float,
    usage: Callable[[], Awaitable[int]],
    stop: Callable[[], Awaitable[None]],
    name: str,
) -> tuple[T, tuple[int, bool]]:
    """Await a run while watching the workspace's disk usage; a run that grows it
    past ``cap`` (or past what it held at the start, if already over) is stopped.
    Returns the run and (usage after it, stopped?)."""
    stopped = asyncio.Event()

    async def watch() -> None:
        limit = max(cap, await usage())
        interval = interval_s
        while True:
            await asyncio.sleep(interval)
            started = time.monotonic()
            used = await usage()
            # big trees cost more to walk: look less often, at most 10% of a core
            interval = max(interval_s, 10 * (time.monotonic() - started))
            if used > limit:
                log.warning("run stopped: workspace over its cap", used=used, cap=cap)
                stopped.set()
                await stop()
                return

    guard = asyncio.create_task(watch(), name=name)
    try:
        result = await running
    finally:
        if not stopped.is_set():
            guard.cancel()
        # else let it finish replacing the container: the next call must not find
        # the old one half-removed
        # the guard's own failure (engine trouble while replacing) is only logged:
        # the run's result is what the caller needs
        (outcome,) = await asyncio.gather(guard, return_exceptions=True)
        if isinstance(outcome, Exception):
            log.warning("workspace guard failed", error=str(outcome))
    return result, (await usage(), stopped.is_set())
