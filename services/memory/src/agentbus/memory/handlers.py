"""Memory handlers: store every task event, answer task-history requests.

Thin on purpose: read the message, call the domain, call the database.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from faststream.nats import NatsBroker, NatsMessage, NatsRouter

from agentbus.contracts import TaskHistoryReply, TaskHistoryRequest, subjects
from agentbus.core.bus import PoisonMessage, durable_subscriber
from agentbus.core.settings import BusSettings

from . import domain
from .adapters.db import Database, DatabaseUnavailable

log = structlog.get_logger(__name__)


@dataclass
class MemoryDeps:
    """What the handlers need; the database is opened in the app's start-up hook."""

    bus: BusSettings
    event_workers: int = 4
    db: Database | None = None

    @property
    def database(self) -> Database:
        if self.db is None:  # pragma: no cover - subscribers start after the start-up hook
            raise RuntimeError("memory's database is not open yet")
        return self.db

    async def ready(self) -> bool:
        """Readiness: the database answers ``SELECT 1``."""
        return self.db is not None and await self.db.ping()


async def store_event(deps: MemoryDeps, msg: NatsMessage) -> None:
    """Store one event from the stream and fold it into its task's projection.

    Returning normally acks the message, which happens only after the transaction
    committed; a database error propagates, so the event is retried (then dead-lettered).
    """
    raw = msg.raw_message
    meta = raw.metadata
    try:
        incoming = domain.read_event(
            msg.body,
            subject=raw.subject,
            stream_seq=meta.sequence.stream,
            received_at=meta.timestamp,
            msg_id=(msg.headers or {}).get("Nats-Msg-Id"),
        )
    except domain.InvalidEvent as exc:
        raise PoisonMessage(str(exc)) from exc
    record = incoming.record
    with structlog.contextvars.bound_contextvars(task_id=record.task_id):
        if not incoming.known:
            log.warning(
                "storing an event of a type this version does not know",
                event_type=record.type,
                event_id=record.event_id,
            )
        stored = await deps.database.record(record, incoming.event)
        if not stored:
            log.info("event already stored; ignored", event_id=record.event_id)


async def answer_history(db: Database | None, task_id: str) -> TaskHistoryReply:
    """A task's summary and events; an error reply (never silence) if that cannot be done."""
    if db is None:
        return TaskHistoryReply(ok=False, error="memory is starting: its database is not open yet")
    try:
        projection, events = await db.task_history(task_id)
    except DatabaseUnavailable as exc:
        log.warning("task history failed", error=str(exc))
        return TaskHistoryReply(ok=False, error=f"cannot read task history: {exc}")
    if projection is None and not events:
        return TaskHistoryReply(ok=False, error=f"unknown task {task_id}")
    summary = projection.summary() if projection is not None else None
    return TaskHistoryReply(task=summary, events=events)


def register(broker: NatsBroker | NatsRouter, deps: MemoryDeps) -> None:
    """Subscribe memory's handlers: one durable consumer on every task event (shared by
    all replicas) and the task-history responder (a queue group)."""
    workers = max(1, deps.event_workers)

    @durable_subscriber(
        broker,
        subjects.EVENTS_SUBJECTS,
        durable=subjects.MEMORY_EVENTS_DURABLE,
        settings=deps.bus,
        max_workers=workers,
        description="Every lifecycle event of every task (any agentbus.contracts event, "
        "and unknown types kept as they came), stored in the event log and folded into "
        "the task's projection.",
    )
    async def on_event(msg: NatsMessage) -> None:
        await store_event(deps, msg)

    @broker.subscriber(
        subjects.MEMORY_TASK_HISTORY,
        queue=subjects.MEMORY_QUEUE,
        description="A task's summary and its events in stream order.",
    )
    async def task_history(request: TaskHistoryRequest) -> TaskHistoryReply:
        with structlog.contextvars.bound_contextvars(task_id=request.task_id):
            return await answer_history(deps.db, request.task_id)
