"""The gateway's ports in memory: memory's directory (keys, task summaries, costs) and
the events stream (stored events per task, and live ones pushed by the test)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    KeyVerifyReply,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    TaskSubmitted,
    TaskSummary,
)
from agentbus.core.ports import RpcError
from agentbus.gateway.domain import hash_key
from agentbus.gateway.ports import StoredMessage


@dataclass
class DirectoryInMemory:
    """Keys by hash; task summaries by id (with their tenant). ``down`` makes every
    call fail as if memory did not answer; ``verified`` counts key checks."""

    keys: dict[str, tuple[str, str]] = field(default_factory=dict)  # hash -> (key_id, tenant)
    known: dict[str, tuple[str, TaskSummary]] = field(default_factory=dict)  # id -> (tenant, s)
    costs_asked: list[CostsRequest] = field(default_factory=list)
    down: bool = False
    verified: int = 0

    def add_key(self, key: str, tenant: str, key_id: str = "key_1") -> None:
        self.keys[hash_key(key)] = (key_id, tenant)

    def _check(self) -> None:
        if self.down:
            raise RpcError("no reply on agentbus.rpc.memory within 5s")

    async def verify_key(self, key_hash: str) -> KeyVerifyReply:
        self._check()
        self.verified += 1
        found = self.keys.get(key_hash)
        if found is None:
            return KeyVerifyReply(ok=False, refused=True, error="unknown or revoked key")
        return KeyVerifyReply(key_id=found[0], tenant=found[1])

    async def history(self, request: TaskHistoryRequest) -> TaskHistoryReply:
        self._check()
        found = self.known.get(request.task_id)
        if found is None or (request.tenant is not None and found[0] != request.tenant):
            return TaskHistoryReply(ok=False, error=f"unknown task {request.task_id}")
        return TaskHistoryReply(task=found[1])

    async def tasks(self, request: TaskListRequest) -> TaskListReply:
        self._check()
        mine = [s for t, s in self.known.values() if t == request.tenant]
        mine.sort(key=lambda s: s.created_at, reverse=True)
        if request.until is not None:
            mine = [s for s in mine if s.created_at < request.until]
        if request.status is not None:
            mine = [s for s in mine if s.status is request.status]
        return TaskListReply(tasks=mine[: request.limit])

    async def costs(self, request: CostsRequest) -> CostsReply:
        self._check()
        self.costs_asked.append(request)
        return CostsReply(tasks=sum(1 for t, _ in self.known.values() if t == request.tenant))


@dataclass
class EventsInMemory:
    """A task's stored events, then whatever ``push`` adds (a live stream)."""

    stored: dict[str, list[StoredMessage]] = field(default_factory=dict)
    submissions: dict[str, TaskSubmitted] = field(default_factory=dict)
    live: dict[str, asyncio.Queue[StoredMessage]] = field(default_factory=dict)
    followers: int = 0
    _seq: int = 0

    def add(self, task_id: str, event_type: str, body: bytes = b"{}") -> StoredMessage:
        self._seq += 1
        message = StoredMessage(self._seq, event_type, body)
        self.stored.setdefault(task_id, []).append(message)
        self.live.setdefault(task_id, asyncio.Queue()).put_nowait(message)
        return message

    async def submitted(self, task_id: str) -> TaskSubmitted | None:
        return self.submissions.get(task_id)

    async def follow(self, task_id: str) -> AsyncIterator[StoredMessage]:
        self.followers += 1
        queue = self.live.setdefault(task_id, asyncio.Queue())
        try:
            while True:
                yield await queue.get()
        finally:
            self.followers -= 1
