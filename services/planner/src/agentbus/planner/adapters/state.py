"""Planner state in a JetStream key-value bucket, updated with compare-and-set, so any
planner replica can take over any task and two replicas never advance it twice."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from agentbus.contracts import subjects

from ..domain import TaskState

Mutation = Callable[[TaskState | None], TaskState | None]


class StateConflictError(RuntimeError):
    """Too many concurrent writers on one task; the event will be redelivered."""


class TaskStore:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.PLANNER_STATE_BUCKET
    ) -> TaskStore:
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE)
            )
        return cls(kv)

    async def load(self, task_id: str) -> tuple[TaskState, int] | None:
        try:
            entry = await self._kv.get(task_id)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return TaskState.model_validate_json(entry.value), entry.revision

    async def mutate(
        self, task_id: str, change: Mutation, *, attempts: int = 20
    ) -> TaskState | None:
        """Apply ``change`` to a copy of the current state and save it with compare-and-set,
        retrying on conflict. ``change`` returns None to leave the state as it is."""
        for _ in range(attempts):
            current = await self.load(task_id)
            before = current[0].model_copy(deep=True) if current else None
            after = change(before)
            if after is None:
                return current[0] if current else None
            payload = after.model_dump_json().encode()
            try:
                if current is None:
                    await self._kv.create(task_id, payload)
                else:
                    await self._kv.update(task_id, payload, last=current[1])
            except KeyWrongLastSequenceError:
                continue
            return after
        raise StateConflictError(f"task {task_id}: state kept changing under {attempts} attempts")
