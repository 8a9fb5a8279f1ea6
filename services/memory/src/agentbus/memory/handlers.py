"""Memory handlers: store task events in batches, answer memory and task queries.

Thin on purpose: read the messages, call the domain, call the database.

Events come in batches from one durable pull consumer (all replicas share it). A batch
is written in one transaction and its messages are acked only after the commit:

* a message that can never be stored (not JSON, an invalid event) is dead-lettered at
  once and acked; the rest of the batch goes on;
* a database outage (server down or restarting, connection dropped) is waited out:
  the same batch is retried with capped exponential backoff while every message is
  kept "in progress", so JetStream neither redelivers it elsewhere nor counts
  deliveries, and no good event is dead-lettered because Postgres was away. Only a
  shutdown ends the wait; the batch is then left unacked and redelivered later;
* any other database error means something in the batch is wrong: the batch is
  retried one event at a time, so only the offending event is nacked (retried with
  backoff, dead-lettered after ``max_deliver`` attempts).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import structlog
from faststream import AckPolicy, Context
from faststream.nats import ConsumerConfig, NatsBroker, NatsRouter, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Tracer
from prometheus_client import Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    MemoryHit,
    MemorySaveReply,
    MemorySaveRequest,
    MemorySearchReply,
    MemorySearchRequest,
    StepSummary,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.bus import DeadLetterPolicy, events_stream, keep_in_progress
from agentbus.core.settings import BusSettings

from . import domain
from .adapters.db import Database, DatabaseUnavailable
from .adapters.embeddings import EmbeddingError, TextTooLong
from .semantic import SemanticMemory

log = structlog.get_logger(__name__)

BatchMessage = Annotated[NatsBatchMessage, Context("message")]


@dataclass
class MemoryDeps:
    """What the handlers need; the database and the model are opened at start-up."""

    bus: BusSettings
    dead_letters: DeadLetterPolicy
    events_durable: str = subjects.MEMORY_EVENTS_DURABLE
    batch_size: int = 100
    batch_wait_s: float = 0.05
    outage_backoff_s: float = 0.5
    outage_backoff_max_s: float = 10.0
    db: Database | None = None
    semantic: SemanticMemory | None = None
    search_seconds: Histogram | None = None
    tracer: Tracer = field(default_factory=lambda: trace.get_tracer("agentbus.memory"))
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def database(self) -> Database:
        if self.db is None:  # pragma: no cover - subscribers start after the start-up hook
            raise RuntimeError("memory's database is not open yet")
        return self.db

    async def ready(self) -> bool:
        """Readiness: the database answers ``SELECT 1``."""
        return self.db is not None and await self.db.ping()


# --- events --------------------------------------------------------------------------


class ShuttingDown(Exception):
    """The service stops while waiting for the database; leave the batch unacked."""


def read(msg: Msg) -> domain.Incoming:
    meta = msg.metadata
    return domain.read_event(
        msg.data,
        subject=msg.subject,
        stream_seq=meta.sequence.stream,
        received_at=meta.timestamp,
        msg_id=(msg.headers or {}).get("Nats-Msg-Id"),
    )


async def store_events(deps: MemoryDeps, messages: Sequence[Msg]) -> None:
    """Store a batch of events (see the module docstring for what happens on errors)."""
    good: list[tuple[Msg, domain.Incoming]] = []
    for msg in messages:
        try:
            good.append((msg, read(msg)))
        except domain.InvalidEvent as exc:
            await deps.dead_letters.dead_letter(msg, exc, msg.metadata.num_delivered)
            await msg.ack()
    for _, incoming in good:
        if not incoming.known:
            record = incoming.record
            log.warning(
                "storing an event of a type this version does not know",
                event_type=record.type,
                event_id=record.event_id,
                task_id=record.task_id,
            )
    if not good:
        return
    async with keep_in_progress(*[m for m, _ in good], every_s=deps.bus.ack_wait_s / 3):
        try:
            stored = await _through_outage(deps, [i for _, i in good])
        except ShuttingDown:
            return
        except Exception as exc:  # noqa: BLE001 - something in the batch; find what
            log.warning("batch write failed; storing one by one", error=str(exc))
            await _one_by_one(deps, good)
            return
    for msg, _ in good:
        await msg.ack()
    duplicates = len(stored) - sum(stored)
    if duplicates:
        log.info("events already stored; ignored", count=duplicates)


async def _through_outage(deps: MemoryDeps, items: list[domain.Incoming]) -> list[bool]:
    """``record_batch``, retried for as long as the database is unavailable."""

    def waiting(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "database unavailable; holding the batch and retrying",
            events=len(items),
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 2),
            error=str(error),
        )

    async def attempt() -> list[bool]:
        if deps.stopping.is_set():
            raise ShuttingDown
        return await deps.database.record_batch(items)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(DatabaseUnavailable),
        wait=wait_exponential(multiplier=deps.outage_backoff_s, max=deps.outage_backoff_max_s),
        before_sleep=waiting,
        reraise=True,
    )
    result: list[bool] = await retrying(attempt)
    return result


async def _one_by_one(deps: MemoryDeps, good: list[tuple[Msg, domain.Incoming]]) -> None:
    for msg, incoming in good:
        try:
            await _through_outage(deps, [incoming])
        except ShuttingDown:
            return
        except Exception as exc:  # noqa: BLE001 - this event's own problem
            delivered = msg.metadata.num_delivered
            if delivered >= deps.bus.max_deliver:
                await deps.dead_letters.dead_letter(msg, exc, delivered)
                await msg.ack()
            else:
                log.warning("event failed; will retry", error=str(exc), delivery=delivered)
                await msg.nak(delay=deps.dead_letters.backoff(delivered))
        else:
            await msg.ack()


# --- task queries --------------------------------------------------------------------

_NOT_OPEN = "memory is starting: its database is not open yet"


def _steps(projection: domain.TaskProjection | None) -> list[StepSummary]:
    if projection is None:
        return []
    return [StepSummary.model_validate(s.to_json()) for s in projection.steps]


async def answer_history(db: Database | None, task_id: str) -> TaskHistoryReply:
    """A task's summary, steps and events; an error reply (never silence) if that fails."""
    if db is None:
        return TaskHistoryReply(ok=False, error=_NOT_OPEN)
    try:
        projection, events = await db.task_history(task_id)
    except DatabaseUnavailable as exc:
        log.warning("task history failed", error=str(exc))
        return TaskHistoryReply(ok=False, error=f"cannot read task history: {exc}")
    if projection is None and not events:
        return TaskHistoryReply(ok=False, error=f"unknown task {task_id}")
    summary = projection.summary() if projection is not None else None
    return TaskHistoryReply(task=summary, events=events, steps=_steps(projection))


async def answer_task_list(db: Database | None, request: TaskListRequest) -> TaskListReply:
    if db is None:
        return TaskListReply(ok=False, error=_NOT_OPEN)
    try:
        found = await db.list_tasks(
            status=request.status.value if request.status else None,
            since=request.since,
            until=request.until,
            limit=request.limit,
        )
    except DatabaseUnavailable as exc:
        return TaskListReply(ok=False, error=f"cannot list tasks: {exc}")
    return TaskListReply(tasks=[p.summary() for p in found])


async def answer_costs(db: Database | None, request: CostsRequest) -> CostsReply:
    if db is None:
        return CostsReply(ok=False, error=_NOT_OPEN)
    try:
        report = await db.costs(
            since=request.since, until=request.until, top_tasks=request.top_tasks
        )
    except DatabaseUnavailable as exc:
        return CostsReply(ok=False, error=f"cannot total costs: {exc}")
    return CostsReply(
        tasks=report.tasks,
        total=report.total(),
        by_model=report.model_usage(),
        by_task=report.costliest,
    )


# --- semantic memory -----------------------------------------------------------------


def _refusal(exc: Exception) -> str | None:
    """The error to reply with for a request memory cannot serve, or None to re-raise."""
    if isinstance(exc, domain.TextTooLarge | TextTooLong):
        return str(exc)
    if isinstance(exc, DatabaseUnavailable):
        return f"memory's database is unavailable: {exc}"
    if isinstance(exc, EmbeddingError):
        return f"cannot embed the text: {exc}"
    return None


async def answer_save(
    semantic: SemanticMemory | None, request: MemorySaveRequest
) -> MemorySaveReply:
    if semantic is None:
        return MemorySaveReply(ok=False, error="memory is starting: semantic memory is not ready")
    try:
        memory_id = await semantic.save(request)
    except Exception as exc:
        reason = _refusal(exc)
        if reason is None:
            raise
        log.warning("memory save refused", error=reason)
        return MemorySaveReply(ok=False, error=reason)
    return MemorySaveReply(memory_id=memory_id)


async def answer_search(
    semantic: SemanticMemory | None, request: MemorySearchRequest
) -> MemorySearchReply:
    if semantic is None:
        return MemorySearchReply(ok=False, error="memory is starting: semantic memory is not ready")
    try:
        found = await semantic.search(request)
    except Exception as exc:
        reason = _refusal(exc)
        if reason is None:
            raise
        log.warning("memory search refused", error=reason)
        return MemorySearchReply(ok=False, error=reason)
    return MemorySearchReply(
        hits=[
            MemoryHit(
                memory_id=f.memory_id,
                text=f.text,
                kind=f.kind,
                score=f.score,
                task_id=f.task_id,
                metadata=f.metadata,
            )
            for f in found
        ]
    )


# --- wiring --------------------------------------------------------------------------


def register(broker: NatsBroker | NatsRouter, deps: MemoryDeps) -> None:
    """Subscribe memory's handlers: one durable batch consumer on every task event
    (shared by all replicas) and the request/reply responders (one queue group)."""

    @broker.subscriber(
        subjects.EVENTS_SUBJECTS,
        stream=events_stream(),
        durable=deps.events_durable,
        pull_sub=PullSub(batch_size=deps.batch_size, timeout=deps.batch_wait_s, batch=True),
        config=ConsumerConfig(
            max_deliver=deps.bus.max_deliver,
            ack_wait=deps.bus.ack_wait_s,
            max_ack_pending=max(1000, 4 * deps.batch_size),
        ),
        ack_policy=AckPolicy.MANUAL,
        description="Every lifecycle event of every task (any agentbus.contracts event, "
        "and unknown types kept as they came), stored in the event log and folded into "
        "the task's projection, in batches of up to one transaction each.",
    )
    async def on_events(message: BatchMessage) -> None:
        await store_events(deps, message.raw_message)

    @broker.subscriber(
        subjects.MEMORY_TASK_HISTORY,
        queue=subjects.MEMORY_QUEUE,
        description="A task's summary, its steps and its events in stream order.",
    )
    async def task_history(request: TaskHistoryRequest) -> TaskHistoryReply:
        with structlog.contextvars.bound_contextvars(task_id=request.task_id):
            return await answer_history(deps.db, request.task_id)

    @broker.subscriber(
        subjects.MEMORY_TASK_LIST,
        queue=subjects.MEMORY_QUEUE,
        description="Tasks by status and submission time, newest first.",
    )
    async def task_list(request: TaskListRequest) -> TaskListReply:
        return await answer_task_list(deps.db, request)

    @broker.subscriber(
        subjects.MEMORY_COSTS,
        queue=subjects.MEMORY_QUEUE,
        description="LLM spend of the tasks submitted in a time range, by model and by task.",
    )
    async def costs(request: CostsRequest) -> CostsReply:
        return await answer_costs(deps.db, request)

    @broker.subscriber(
        subjects.MEMORY_SAVE,
        queue=subjects.MEMORY_QUEUE,
        description="Remember a text (embedded by the configured model).",
    )
    async def save(request: MemorySaveRequest) -> MemorySaveReply:
        with structlog.contextvars.bound_contextvars(task_id=request.task_id):
            return await answer_save(deps.semantic, request)

    @broker.subscriber(
        subjects.MEMORY_SEARCH,
        queue=subjects.MEMORY_QUEUE,
        description="The memories nearest in meaning to a query, with filters.",
    )
    async def search(request: MemorySearchRequest) -> MemorySearchReply:
        with (
            structlog.contextvars.bound_contextvars(task_id=request.task_id),
            deps.tracer.start_as_current_span(
                f"{semconv.SPAN_MEMORY} search", attributes={semconv.MEMORY_OPERATION: "search"}
            ) as span,
        ):
            started = time.perf_counter()
            reply = await answer_search(deps.semantic, request)
            outcome = "ok" if reply.ok else "refused"
            span.set_attribute(semconv.MEMORY_HITS, len(reply.hits))
            if deps.search_seconds is not None:
                deps.search_seconds.labels(outcome).observe(time.perf_counter() - started)
            return reply
