"""Memory's event log, key store and semantic index in memory: the ``EventLog``,
``KeyStore`` and ``SemanticIndex`` ports of ``agentbus.memory.ports``.

The event log folds known events with the real domain (``domain.replay``), so task
summaries and steps come out as the Postgres one would give them. ``down`` makes every
call fail as during an outage (``DatabaseUnavailable``); ``rejects`` makes a write that
contains one of those event ids fail as a bad row would (a constraint violation).
A tenant filter sees a task as the Postgres one does: by the tenant of its projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from agentbus.contracts import (
    Event,
    KeyInfo,
    MemorySaveRequest,
    MemorySearchRequest,
    StoredEvent,
    TaskCost,
    Usage,
    new_id,
    utcnow,
)
from agentbus.memory import domain
from agentbus.memory.ports import DatabaseUnavailable, DuplicateKey


class RejectedRow(Exception):
    """What the database says of a row it will never take (not an outage)."""


class InMemoryEventLog:
    def __init__(self) -> None:
        self.stored: dict[str, domain.Incoming] = {}  # by event id, in the order stored
        self.attempts = 0  # record_batch calls, failed ones included
        self.writes = 0  # record_batch calls that committed
        self.down: str | None = None
        self.rejects: set[str] = set()
        self._seq = 0

    def add(self, *events: Event) -> None:
        """Store events as if they had come through the stream (for the queries)."""
        for event in events:
            self._seq += 1
            incoming = domain.read_event(
                event.model_dump_json().encode(),
                subject=event.subject,
                stream_seq=self._seq,
                received_at=event.occurred_at,
            )
            self.stored.setdefault(incoming.record.event_id, incoming)

    def types(self, task_id: str) -> list[str]:
        """The stored event types of a task, in stream order."""
        return [i.record.type for i in self._of(task_id)]

    def _check(self) -> None:
        if self.down is not None:
            raise DatabaseUnavailable(self.down)

    def _of(self, task_id: str) -> list[domain.Incoming]:
        found = [i for i in self.stored.values() if i.record.task_id == task_id]
        return sorted(found, key=lambda i: i.record.stream_seq)

    def _projection(self, task_id: str) -> domain.TaskProjection | None:
        return domain.replay(
            (i.record.stream_seq, i.event) for i in self._of(task_id) if i.event is not None
        )

    def _projections(
        self, since: datetime | None, until: datetime | None, tenant: str | None
    ) -> list[domain.TaskProjection]:
        tasks = dict.fromkeys(i.record.task_id for i in self.stored.values())
        found = [p for t in tasks if (p := self._projection(t)) is not None]
        return [
            p
            for p in found
            if (since is None or p.created_at >= since)
            and (until is None or p.created_at < until)
            and tenant in (None, p.tenant)
        ]

    async def record_batch(self, items: Sequence[domain.Incoming]) -> list[bool]:
        self.attempts += 1
        self._check()
        bad = [i.record.event_id for i in items if i.record.event_id in self.rejects]
        if bad:
            raise RejectedRow(f"new row for event {bad[0]} violates a check constraint")
        stored = []
        for item in items:
            new = item.record.event_id not in self.stored
            stored.append(new)
            self.stored.setdefault(item.record.event_id, item)
        self.writes += 1
        return stored

    async def task_history(
        self, task_id: str, *, tenant: str | None = None
    ) -> tuple[domain.TaskProjection | None, list[StoredEvent]]:
        self._check()
        projection = self._projection(task_id)
        if tenant is not None and (projection is None or projection.tenant != tenant):
            return None, []
        events = [
            StoredEvent(
                seq=i.record.stream_seq,
                event_id=i.record.event_id,
                type=i.record.type,
                occurred_at=i.record.occurred_at,
                payload=i.record.payload,
            )
            for i in self._of(task_id)
        ]
        return projection, events

    async def list_tasks(
        self,
        *,
        status: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        tenant: str | None = None,
    ) -> list[domain.TaskProjection]:
        self._check()
        found = [
            p for p in self._projections(since, until, tenant) if status in (None, p.status.value)
        ]
        return sorted(found, key=lambda p: p.created_at, reverse=True)[:limit]

    async def costs(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        top_tasks: int,
        tenant: str | None = None,
    ) -> domain.CostReport:
        """Spend as the tasks' projections report it (the fake keeps no ``llm_calls``)."""
        self._check()
        found = self._projections(since, until, tenant)
        spent = sum((p.usage for p in found), Usage())
        by_task = sorted(found, key=lambda p: p.usage.total.cost_usd, reverse=True)
        return domain.CostReport(
            tasks=len(found),
            by_model={m: u.model_dump() for m, u in spent.by_model.items()},
            costliest=[
                TaskCost(
                    task_id=p.task_id,
                    goal=p.goal,
                    status=p.status,
                    created_at=p.created_at,
                    usage=p.usage,
                )
                for p in by_task[:top_tasks]
            ],
        )

    async def ping(self) -> bool:
        return self.down is None


class InMemoryKeyStore:
    """API keys by hash, as the ``api_keys`` table keeps them; ``down`` as above."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, KeyInfo]] = {}  # by key id: (hash, info)
        self.down: str | None = None

    def _check(self) -> None:
        if self.down is not None:
            raise DatabaseUnavailable(self.down)

    async def create_key(self, *, key_id: str, tenant: str, key_hash: str, prefix: str) -> KeyInfo:
        self._check()
        if any(stored == key_hash for stored, _ in self.keys.values()):
            raise DuplicateKey("a key with this hash is stored already")
        info = KeyInfo(key_id=key_id, tenant=tenant, prefix=prefix, created_at=utcnow())
        self.keys[key_id] = (key_hash, info)
        return info

    async def list_keys(self, *, tenant: str | None) -> list[KeyInfo]:
        self._check()
        return [info for _, info in self.keys.values() if tenant in (None, info.tenant)]

    async def revoke_key(self, key_id: str) -> bool:
        self._check()
        found = self.keys.get(key_id)
        if found is None or found[1].revoked_at is not None:
            return False
        key_hash, info = found
        self.keys[key_id] = (key_hash, info.model_copy(update={"revoked_at": utcnow()}))
        return True

    async def verify_key(self, key_hash: str) -> KeyInfo | None:
        self._check()
        return next(
            (i for h, i in self.keys.values() if h == key_hash and i.revoked_at is None), None
        )


class InMemorySemanticIndex:
    """Texts found by the words they share with the query (score: the share of the
    query's words found). Refuses texts over ``max_chars`` as semantic memory does;
    ``failure`` is raised by every call (an outage, a failing embedding model)."""

    def __init__(self, max_chars: int = 20_000) -> None:
        self.max_chars = max_chars
        self.memories: list[domain.Found] = []
        self.failure: Exception | None = None

    async def save(self, request: MemorySaveRequest) -> str:
        if self.failure is not None:
            raise self.failure
        text = domain.check_size(request.text, self.max_chars)
        memory = domain.Found(
            memory_id=new_id("mem"),
            text=text,
            kind=request.kind,
            score=1.0,
            task_id=request.task_id,
            metadata=request.metadata,
        )
        self.memories.append(memory)
        return memory.memory_id

    async def search(self, request: MemorySearchRequest) -> list[domain.Found]:
        if self.failure is not None:
            raise self.failure
        words = set(domain.check_size(request.query, self.max_chars, "query").lower().split())
        hits = []
        for memory in self.memories:
            score = len(words & set(memory.text.lower().split())) / len(words)
            if (
                score >= request.min_score
                and request.kind in (None, memory.kind)
                and request.task_id in (None, memory.task_id)
                and all(memory.metadata.get(k) == v for k, v in request.metadata.items())
            ):
                hits.append(replace(memory, score=score))
        return sorted(hits, key=lambda f: f.score, reverse=True)[: request.k]
