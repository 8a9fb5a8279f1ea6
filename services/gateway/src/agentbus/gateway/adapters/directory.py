"""Memory, asked over NATS request/reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from faststream.nats import NatsBroker
from pydantic import BaseModel

from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    KeyVerifyReply,
    KeyVerifyRequest,
    Reply,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    subjects,
)
from agentbus.core.bus import rpc

R = TypeVar("R", bound=Reply)


@dataclass(frozen=True)
class BusDirectory:
    broker: NatsBroker
    timeout_s: float

    async def _ask(self, subject: str, request: BaseModel, reply_type: type[R]) -> R:
        return await rpc(self.broker, subject, request, reply_type, timeout=self.timeout_s)

    async def verify_key(self, key_hash: str) -> KeyVerifyReply:
        request = KeyVerifyRequest(key_hash=key_hash)
        return await self._ask(subjects.MEMORY_KEYS_VERIFY, request, KeyVerifyReply)

    async def history(self, request: TaskHistoryRequest) -> TaskHistoryReply:
        return await self._ask(subjects.MEMORY_TASK_HISTORY, request, TaskHistoryReply)

    async def tasks(self, request: TaskListRequest) -> TaskListReply:
        return await self._ask(subjects.MEMORY_TASK_LIST, request, TaskListReply)

    async def costs(self, request: CostsRequest) -> CostsReply:
        return await self._ask(subjects.MEMORY_COSTS, request, CostsReply)
