"""A paused step's dialogue, kept in a JetStream KV bucket so the step resumes where it
stopped, on any executor replica, after any restart."""

from __future__ import annotations

from nats.js import JetStreamContext
from pydantic import BaseModel, Field

from agentbus.contracts import subjects
from agentbus.core.kv import CasStore, open_bucket
from agentbus.core.llm import Message

_KEEP_S = 7 * 24 * 3600.0  # longer than any approval wait


class StepCheckpoint(BaseModel):
    conversation: str = Field(description="The dialogue's key (replay and traces use it).")
    messages: list[Message] = Field(description="The dialogue up to the refused call.")
    touched_workspace: bool = False


class CheckpointStore:
    def __init__(self, store: CasStore[StepCheckpoint]) -> None:
        self._store = store

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.STEP_CHECKPOINT_BUCKET
    ) -> CheckpointStore:
        return cls(CasStore(await open_bucket(js, bucket, ttl_s=_KEEP_S), StepCheckpoint))

    @staticmethod
    def key(task_id: str, step_id: str) -> str:
        return f"{task_id}.{step_id}"

    async def load(self, task_id: str, step_id: str) -> StepCheckpoint | None:
        found = await self._store.load(self.key(task_id, step_id))
        return found[0] if found else None

    async def save(self, task_id: str, step_id: str, checkpoint: StepCheckpoint) -> None:
        await self._store.kv.put(self.key(task_id, step_id), checkpoint.model_dump_json().encode())

    async def drop(self, task_id: str, step_id: str) -> None:
        await self._store.delete(self.key(task_id, step_id))
