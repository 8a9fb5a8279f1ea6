"""What the gateway's use cases need from outside. The real ones: memory over NATS
request/reply (``adapters.directory.BusDirectory``), the events stream
(``adapters.events.StreamEvents``) and ``agentbus.core.bus.BusPublisher``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    KeyVerifyReply,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    TaskSubmitted,
)
from agentbus.core.ports import Publisher, RpcError

__all__ = ["Directory", "EventLog", "Publisher", "RpcError", "StoredMessage"]


class Directory(Protocol):
    """Memory: API keys, task summaries and costs. Raises RpcError when it cannot answer."""

    async def verify_key(self, key_hash: str) -> KeyVerifyReply: ...

    async def history(self, request: TaskHistoryRequest) -> TaskHistoryReply: ...

    async def tasks(self, request: TaskListRequest) -> TaskListReply: ...

    async def costs(self, request: CostsRequest) -> CostsReply: ...


@dataclass(frozen=True)
class StoredMessage:
    """One event as the stream holds it: its sequence, type and body as published."""

    seq: int
    type: str
    body: bytes


class EventLog(Protocol):
    """The events stream (JetStream), read directly: no database in the way."""

    async def submitted(self, task_id: str) -> TaskSubmitted | None:
        """The task's ``TaskSubmitted``, if the stream still holds it."""
        ...

    def follow(self, task_id: str) -> AsyncIterator[StoredMessage]:
        """Every event of the task in stream order, from its first, then each new one
        as it is published; ends only when the caller stops reading."""
        ...
