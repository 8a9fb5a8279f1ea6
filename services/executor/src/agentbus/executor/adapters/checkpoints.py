"""A paused step's dialogue, kept in a JetStream KV bucket so the step resumes where it
stopped, on any executor replica, after any restart."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from agentbus.contracts import subjects
from agentbus.core.kv import open_bucket

from ..ports import StepCheckpoint

_KEEP_S = 7 * 24 * 3600.0  # longer than any approval wait


class CheckpointStore:
    """The :class:`~agentbus.executor.ports.Checkpoints` port on a KV bucket. One writer
    per step at a time (the executor running it), so plain puts: no compare-and-set, and
    nothing cached."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.STEP_CHECKPOINT_BUCKET
    ) -> CheckpointStore:
        return cls(await open_bucket(js, bucket, ttl_s=_KEEP_S))

    @staticmethod
    def key(task_id: str, step_id: str) -> str:
        return f"{task_id}.{step_id}"

    async def load(self, task_id: str, step_id: str) -> StepCheckpoint | None:
        try:
            entry = await self._kv.get(self.key(task_id, step_id))
        except KeyNotFoundError:
            return None
        return StepCheckpoint.model_validate_json(entry.value) if entry.value else None

    async def save(self, task_id: str, step_id: str, checkpoint: StepCheckpoint) -> None:
        await self._kv.put(self.key(task_id, step_id), checkpoint.model_dump_json().encode())

    async def drop(self, task_id: str, step_id: str) -> None:
        try:
            await self._kv.delete(self.key(task_id, step_id))
        except KeyNotFoundError:
            return
