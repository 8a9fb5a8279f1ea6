"""The planner's Timers port in memory: each live task's next deadline."""

from __future__ import annotations

from datetime import datetime


class MemoryTimers:
    def __init__(self) -> None:
        self.deadlines: dict[str, datetime] = {}

    async def set(self, task_id: str, at: datetime | None) -> None:
        if at is None:
            self.deadlines.pop(task_id, None)
        else:
            self.deadlines[task_id] = at

    async def due(self, now: datetime) -> list[str]:
        return [task_id for task_id, at in self.deadlines.items() if at <= now]
