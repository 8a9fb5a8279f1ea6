"""Memory's use cases: store task events in batches, answer memory and task queries.

Thin on purpose: read the messages, call the domain, call the ports.

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

import structlog
from opentelemetry.trace import Tracer
from prometheus_client import Histogram
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    KeyCreateReply,
    KeyCreateRequest,
    KeyListReply,
    KeyListRequest,
    KeyRevokeReply,
    KeyRevokeRequest,
    KeyVerifyReply,
    KeyVerifyRequest,
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
    new_id,
)
from agentbus.core import semconv
from agentbus.core.progress import keep_in_progress

from . import domain
from .ports import (
    DatabaseUnavailable,
    DeadLetterSink,
    Delivery,
    DuplicateKey,
    EmbeddingError,
    EventLog,
    KeyStore,
    SemanticIndex,
    TextTooLong,
)

log = structlog.get_logger(__name__)


# --- events --------------------------------------------------------------------------


class ShuttingDown(Exception):
    """The service stops while waiting for the database; leave the batch unacked."""


def read(delivery: Delivery) -> domain.Incoming:
    return domain.read_event(
        delivery.data,
        subject=delivery.subject,
        stream_seq=delivery.stream_seq,
        received_at=delivery.timestamp,
        msg_id=delivery.msg_id,
    )


@dataclass(eq=False, kw_only=True)
class EventRecorder:
    """Stores batches of task events in the event log (see the module docstring).

    ``stop()`` is the shutdown signal: a batch waiting out an outage is then left
    unacked, for a replica that can store it."""

    events: EventLog
    dead_letters: DeadLetterSink
    max_deliver: int
    ack_wait_s: float
    outage_backoff_s: float
    outage_backoff_max_s: float
    stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def stop(self) -> None:
        self.stopping.set()

    async def store_events(self, deliveries: Sequence[Delivery]) -> None:
        """Store a batch of events (see the module docstring for what happens on errors)."""
        good: list[tuple[Delivery, domain.Incoming]] = []
        for delivery in deliveries:
            try:
                good.append((delivery, read(delivery)))
            except domain.InvalidEvent as exc:
                await self.dead_letters.dead_letter(delivery, exc, delivery.num_delivered)
                await delivery.ack()
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
        async with keep_in_progress(*[d for d, _ in good], every_s=self.ack_wait_s / 3):
            try:
                stored = await self._through_outage([i for _, i in good])
            except ShuttingDown:
                return
            except Exception as exc:  # noqa: BLE001 - something in the batch; find what
                log.warning("batch write failed; storing one by one", error=str(exc))
                await self._one_by_one(good)
                return
        for delivery, _ in good:
            await delivery.ack()
        duplicates = len(stored) - sum(stored)
        if duplicates:
            log.info("events already stored; ignored", count=duplicates)

    async def _through_outage(self, items: list[domain.Incoming]) -> list[bool]:
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
            if self.stopping.is_set():
                raise ShuttingDown
            return await self.events.record_batch(items)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(DatabaseUnavailable),
            wait=wait_exponential(multiplier=self.outage_backoff_s, max=self.outage_backoff_max_s),
            before_sleep=waiting,
            reraise=True,
        )
        result: list[bool] = await retrying(attempt)
        return result

    async def _one_by_one(self, good: list[tuple[Delivery, domain.Incoming]]) -> None:
        for delivery, incoming in good:
            try:
                await self._through_outage([incoming])
            except ShuttingDown:
                return
            except Exception as exc:  # noqa: BLE001 - this event's own problem
                delivered = delivery.num_delivered
                if delivered >= self.max_deliver:
                    await self.dead_letters.dead_letter(delivery, exc, delivered)
                    await delivery.ack()
                else:
                    log.warning("event failed; will retry", error=str(exc), delivery=delivered)
                    await delivery.nak(delay=self.dead_letters.backoff(delivered))
            else:
                await delivery.ack()


# --- task queries --------------------------------------------------------------------


def _steps(projection: domain.TaskProjection | None) -> list[StepSummary]:
    if projection is None:
        return []
    return [StepSummary.model_validate(s.to_json()) for s in projection.steps]


@dataclass(eq=False)
class TaskQueries:
    """Tasks as the event log describes them: history, lists, costs. A request naming a
    tenant sees only that tenant's tasks: another's task is an unknown task."""

    events: EventLog

    async def ready(self) -> bool:
        """Readiness: the database answers ``SELECT 1``."""
        return await self.events.ping()

    async def answer_history(self, request: TaskHistoryRequest) -> TaskHistoryReply:
        """A task's summary, steps and events; an error reply (never silence) if that fails."""
        task_id = request.task_id
        try:
            projection, events = await self.events.task_history(task_id, tenant=request.tenant)
        except DatabaseUnavailable as exc:
            log.warning("task history failed", error=str(exc))
            return TaskHistoryReply(ok=False, error=f"cannot read task history: {exc}")
        if projection is None and not events:
            return TaskHistoryReply(ok=False, error=f"unknown task {task_id}")
        summary = projection.summary() if projection is not None else None
        return TaskHistoryReply(task=summary, events=events, steps=_steps(projection))

    async def answer_task_list(self, request: TaskListRequest) -> TaskListReply:
        try:
            found = await self.events.list_tasks(
                status=request.status.value if request.status else None,
                since=request.since,
                until=request.until,
                limit=request.limit,
                tenant=request.tenant,
            )
        except DatabaseUnavailable as exc:
            return TaskListReply(ok=False, error=f"cannot list tasks: {exc}")
        return TaskListReply(tasks=[p.summary() for p in found])

    async def answer_costs(self, request: CostsRequest) -> CostsReply:
        try:
            report = await self.events.costs(
                since=request.since,
                until=request.until,
                top_tasks=request.top_tasks,
                tenant=request.tenant,
            )
        except DatabaseUnavailable as exc:
            return CostsReply(ok=False, error=f"cannot total costs: {exc}")
        return CostsReply(
            tasks=report.tasks,
            total=report.total(),
            by_model=report.model_usage(),
            by_task=report.costliest,
        )


# --- API keys ------------------------------------------------------------------------

# The refusal of a key that is not stored or was revoked (the gateway answers 401).
UNKNOWN_KEY = "unknown or revoked key"


@dataclass(eq=False)
class KeyQueries:
    """The gateway's API keys: created, listed and revoked by an operator (``agentbus
    keys``), verified by the gateway. Only hashes arrive; neither a key nor its hash is
    ever logged."""

    keys: KeyStore

    async def answer_create(self, request: KeyCreateRequest) -> KeyCreateReply:
        try:
            key = await self.keys.create_key(
                key_id=new_id("key"),
                tenant=request.tenant,
                key_hash=request.key_hash,
                prefix=request.prefix,
            )
        except DuplicateKey:
            return KeyCreateReply(
                ok=False, error="a key with this hash is stored already: generate a new key"
            )
        except DatabaseUnavailable as exc:
            log.warning("key creation failed", error=str(exc))
            return KeyCreateReply(ok=False, error=f"cannot create the key: {exc}")
        log.info("api key created", key_id=key.key_id, tenant=key.tenant)
        return KeyCreateReply(key=key)

    async def answer_list(self, request: KeyListRequest) -> KeyListReply:
        try:
            keys = await self.keys.list_keys(tenant=request.tenant)
        except DatabaseUnavailable as exc:
            return KeyListReply(ok=False, error=f"cannot list keys: {exc}")
        return KeyListReply(keys=keys)

    async def answer_revoke(self, request: KeyRevokeRequest) -> KeyRevokeReply:
        try:
            revoked = await self.keys.revoke_key(request.key_id)
        except DatabaseUnavailable as exc:
            log.warning("key revocation failed", key_id=request.key_id, error=str(exc))
            return KeyRevokeReply(ok=False, error=f"cannot revoke the key: {exc}")
        if revoked:
            log.info("api key revoked", key_id=request.key_id)
        return KeyRevokeReply(revoked=revoked)

    async def answer_verify(self, request: KeyVerifyRequest) -> KeyVerifyReply:
        try:
            key = await self.keys.verify_key(request.key_hash)
        except DatabaseUnavailable as exc:
            log.warning("key check failed", error=str(exc))
            return KeyVerifyReply(ok=False, error=f"cannot check the key: {exc}")
        if key is None:
            return KeyVerifyReply(ok=False, refused=True, error=UNKNOWN_KEY)
        return KeyVerifyReply(key_id=key.key_id, tenant=key.tenant)


# --- semantic memory -----------------------------------------------------------------


# What a request can run into that memory explains to the caller; anything else is raised.
_REFUSED = (domain.TextTooLarge, TextTooLong, DatabaseUnavailable, EmbeddingError)


def _refusal(exc: Exception, event: str) -> str:
    """The error to reply with for a request memory cannot serve (logged as ``event``)."""
    if isinstance(exc, DatabaseUnavailable):
        reason = f"memory's database is unavailable: {exc}"
    elif isinstance(exc, EmbeddingError):
        reason = f"cannot embed the text: {exc}"
    else:
        reason = str(exc)
    log.warning(event, error=reason)
    return reason


@dataclass(eq=False, kw_only=True)
class SemanticQueries:
    """Save and search semantic memory; a request it cannot serve gets the reason.

    Every search is a span (with its hit count) and one observation of
    ``search_seconds`` labelled ``ok`` or ``refused``."""

    index: SemanticIndex
    tracer: Tracer
    search_seconds: Histogram

    async def answer_save(self, request: MemorySaveRequest) -> MemorySaveReply:
        try:
            memory_id = await self.index.save(request)
        except _REFUSED as exc:
            return MemorySaveReply(ok=False, error=_refusal(exc, "memory save refused"))
        return MemorySaveReply(memory_id=memory_id)

    async def answer_search(self, request: MemorySearchRequest) -> MemorySearchReply:
        with self.tracer.start_as_current_span(
            f"{semconv.SPAN_MEMORY} search", attributes={semconv.MEMORY_OPERATION: "search"}
        ) as span:
            started = time.perf_counter()
            reply = await self._search(request)
            outcome = "ok" if reply.ok else "refused"
            span.set_attribute(semconv.MEMORY_HITS, len(reply.hits))
            self.search_seconds.labels(outcome).observe(time.perf_counter() - started)
            return reply

    async def _search(self, request: MemorySearchRequest) -> MemorySearchReply:
        try:
            found = await self.index.search(request)
        except _REFUSED as exc:
            return MemorySearchReply(ok=False, error=_refusal(exc, "memory search refused"))
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


# --- all of them ---------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MemoryUseCases:
    """What memory's routes call: built at start-up, once the database is open."""

    recorder: EventRecorder
    tasks: TaskQueries
    semantic: SemanticQueries
    keys: KeyQueries
