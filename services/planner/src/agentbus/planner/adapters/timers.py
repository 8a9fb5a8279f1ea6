"""When each live task must be looked at again if no event comes: the end of its time
budget, or the end of its wait for approval. One key per task in a JetStream KV bucket,
so any planner replica can act on any task's deadline, across restarts."""

from __future__ import annotations

from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from agentbus.contracts import subjects
from agentbus.core.kv import open_bucket

_REMEMBER = 10_000


class TimerStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv
        # What this process last wrote per task, so an event that leaves the deadline as
        # it was costs no write. Safe across replicas: a task's deadlines only move on
        # (pause, approval), so a value this process wrote never becomes right again
        # after another replica replaced it.
        self._written: dict[str, datetime] = {}

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.PLANNER_TIMERS_BUCKET
    ) -> TimerStore:
        return cls(await open_bucket(js, bucket))

    async def set(self, task_id: str, at: datetime | None) -> None:
        """Look at the task again at ``at``; None forgets it (the task has ended)."""
        if at is None:
            self._written.pop(task_id, None)
            try:
                await self._kv.delete(task_id)
            except KeyNotFoundError:
                return
            return
        if self._written.get(task_id) == at:
            return
        await self._kv.put(task_id, at.isoformat().encode())
        self._written.pop(task_id, None)
        self._written[task_id] = at  # newest last; the oldest go when there are many
        while len(self._written) > _REMEMBER:
            del self._written[next(iter(self._written))]

    async def due(self, now: datetime) -> list[str]:
        """Tasks whose deadline has passed."""
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return []
        due = []
        for key in keys:
            try:
                entry = await self._kv.get(key)
            except KeyNotFoundError:
                continue
            if entry.value and datetime.fromisoformat(entry.value.decode()) <= now:
                due.append(key)
        return due
