"""Planner state in a JetStream key-value bucket, updated with compare-and-set, so any
planner replica can take over any task and two replicas never advance it twice."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext

from agentbus.contracts import subjects
from agentbus.core.kv import CasStore, StateConflictError, open_bucket

from ..domain import TaskState

Mutation = Callable[[TaskState | None], TaskState | None]

__all__ = ["Mutation", "StateConflictError", "TaskStore"]


class TaskStore(CasStore[TaskState]):
    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str = subjects.PLANNER_STATE_BUCKET
    ) -> TaskStore:
        return cls(await open_bucket(js, bucket), TaskState)
