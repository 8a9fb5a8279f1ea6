"""Long-term memory, reached through the memory service over NATS request/reply."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from faststream.nats import NatsBroker

from agentbus.contracts import (
    MemorySaveReply,
    MemorySaveRequest,
    MemorySearchReply,
    MemorySearchRequest,
    subjects,
)
from agentbus.core.bus import rpc
from agentbus.core.ports import RpcError

from ..domain import ExecResult

log = structlog.get_logger(__name__)


@dataclass
class MemoryClient:
    broker: NatsBroker
    task_id: str
    timeout_s: float = 10.0
    min_score: float = 0.3

    async def _search(self, query: str, k: int, min_score: float) -> MemorySearchReply:
        return await rpc(
            self.broker,
            subjects.MEMORY_SEARCH,
            MemorySearchRequest(query=query[:20_000], k=k, min_score=min_score),
            MemorySearchReply,
            timeout=self.timeout_s,
        )

    async def search(self, query: str, k: int) -> ExecResult:
        try:
            reply = await self._search(query, k, 0.0)
        except RpcError as exc:
            return ExecResult(False, f"error: memory did not answer: {exc}")
        if not reply.ok:
            return ExecResult(False, f"error: {reply.error}")
        if not reply.hits:
            return ExecResult(True, "nothing found")
        return ExecResult(True, "\n".join(f"[{h.score:.2f}] {h.text}" for h in reply.hits))

    async def save(self, text: str, kind: str) -> ExecResult:
        request = MemorySaveRequest(
            text=text[:20_000], kind=kind, task_id=self.task_id, source="executor"
        )
        try:
            reply = await rpc(
                self.broker, subjects.MEMORY_SAVE, request, MemorySaveReply, timeout=self.timeout_s
            )
        except RpcError as exc:
            return ExecResult(False, f"error: memory did not answer: {exc}")
        if not reply.ok:
            return ExecResult(False, f"error: {reply.error}")
        return ExecResult(True, f"saved as {reply.memory_id}")

    async def recall(self, query: str, k: int) -> list[str]:
        try:
            reply = await self._search(query, k, self.min_score)
        except RpcError as exc:
            log.info("no memories for this step", reason=str(exc))
            return []
        return [h.text for h in reply.hits] if reply.ok else []
