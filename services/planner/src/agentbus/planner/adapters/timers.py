"""When each live task must be looked at again if no event comes: the end of its time
budget, or the end of its wait for approval. One key per task in a JetStream KV bucket,
so any planner replica can act on any task's deadline, across restarts.

Each replica follows the bucket with a watcher (an ordered consumer that delivers every
key's latest value, then every change) into a map in memory, so the once-a-second
sweep reads no keys: it compares the deadlines it holds with the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

import structlog
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from agentbus.contracts import subjects
from agentbus.core.kv import open_bucket

log = structlog.get_logger(__name__)

_LOAD_WAIT_S = 30.0
_KEEP_MARKERS_S = 3600


class TimerStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        self._deadlines: dict[str, datetime] = {}  # every live task's, as the bucket says
        self._loaded = asyncio.Event()  # the watcher has delivered the bucket's contents
        self._watcher: KeyValue.KeyWatcher | None = None
        self._follow: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.PLANNER_TIMERS_BUCKET
    ) -> TimerStore:
        store = cls(await open_bucket(js, bucket))
        # Ended tasks leave delete markers, which a new watcher would replay: drop the
        # old ones, so starting up reads the live tasks, not every task there ever was.
        with contextlib.suppress(Exception):
            await store._kv.purge_deletes(olderthan=_KEEP_MARKERS_S)
        store._watcher = await store._kv.watchall()
        store._follow = asyncio.create_task(store._run(store._watcher), name="planner-timers")
        return store

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        if self._watcher is not None:
            with contextlib.suppress(Exception):  # the connection may be closed already
                await self._watcher.stop()  # type: ignore[no-untyped-call]

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # the bucket's contents so far are in
                self._loaded.set()
                continue
            if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                self._deadlines.pop(entry.key, None)
                continue
            try:
                self._deadlines[entry.key] = datetime.fromisoformat(entry.value.decode())
            except ValueError:
                log.warning("unreadable deadline ignored", task_id=entry.key)

    async def set(self, task_id: str, at: datetime | None) -> None:
        """Look at the task again at ``at``; None forgets it (the task has ended)."""
        if at is None:
            if self._loaded.is_set() and task_id not in self._deadlines:
                # Gone already (every later event of an ended task lands here). Should the
                # watcher lag behind a deadline just set, the sweep finds it and ends it.
                return
            try:
                await self._kv.delete(task_id)
            except KeyNotFoundError:
                return
            return
        if self._deadlines.get(task_id) == at:
            return  # as the bucket has it already: an event that moved nothing costs nothing
        # The map is the watcher's alone, so it follows the bucket's order of writes: a
        # newer deadline from another replica is never overwritten by this one after it.
        await self._kv.put(task_id, at.isoformat().encode())

    async def due(self, now: datetime) -> list[str]:
        """Tasks whose deadline has passed (once the watcher has loaded the bucket; a
        load that takes longer than ``_LOAD_WAIT_S`` fails this sweep, and the sweeper
        logs it and tries again)."""
        async with asyncio.timeout(_LOAD_WAIT_S):
            await self._loaded.wait()
        return [task_id for task_id, at in self._deadlines.items() if at <= now]
