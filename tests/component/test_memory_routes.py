"""Memory's routes and use cases on in-memory fakes.

The request/reply routes run through ``TestNatsBroker`` (with the service's middlewares)
on an in-memory event log and semantic index. The batch consumer's use case is driven
directly with fake JetStream deliveries: ``TestNatsBroker`` simulates neither pull
batches nor redelivery, which is what those paths are about."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import structlog
from faststream.nats import NatsBroker, TestNatsBroker
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, Histogram
from pydantic import BaseModel

from agentbus.cli.keys import new_key
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
    MemorySaveReply,
    MemorySaveRequest,
    MemorySearchReply,
    MemorySearchRequest,
    ModelUsage,
    PlanCreated,
    PlanStep,
    Reply,
    StepCompleted,
    StepReady,
    TaskCompleted,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    TaskStatus,
    TaskSubmitted,
    Usage,
    new_id,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.bus import create_broker
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, routes
from agentbus.memory.ports import DatabaseUnavailable, EmbeddingError
from agentbus.memory.usecases import (
    EventRecorder,
    KeyQueries,
    MemoryUseCases,
    SemanticQueries,
    TaskQueries,
)
from tests.fakes import (
    FakeDelivery,
    InMemoryEventLog,
    InMemorySemanticIndex,
    RecordingDeadLetters,
    RejectedRow,
)
from tests.fakes.event_log import InMemoryKeyStore

WAIT_S = 2.0  # bound on every wait; each test takes milliseconds
MAX_DELIVER = 3
STEP = PlanStep(id="s1", title="look it up", instructions="find the answer")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def spend(model: str, cost_usd: float) -> Usage:
    return Usage.of(
        model, ModelUsage(prompt_tokens=100, completion_tokens=10, calls=1, cost_usd=cost_usd)
    )


@dataclass
class Rig:
    """Memory's use cases on fakes, with what an operator would see of them."""

    log: InMemoryEventLog = field(default_factory=InMemoryEventLog)
    index: InMemorySemanticIndex = field(default_factory=lambda: InMemorySemanticIndex(200))
    key_store: InMemoryKeyStore = field(default_factory=InMemoryKeyStore)
    dead_letters: RecordingDeadLetters = field(default_factory=RecordingDeadLetters)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)
    spans: InMemorySpanExporter = field(default_factory=InMemorySpanExporter)
    uses: MemoryUseCases = field(init=False)

    def __post_init__(self) -> None:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.uses = MemoryUseCases(
            recorder=EventRecorder(
                events=self.log,
                dead_letters=self.dead_letters,
                max_deliver=MAX_DELIVER,
                ack_wait_s=0.03,  # a heartbeat every 10 ms
                outage_backoff_s=0.001,
                outage_backoff_max_s=0.004,
            ),
            tasks=TaskQueries(self.log),
            semantic=SemanticQueries(
                index=self.index,
                tracer=provider.get_tracer("test"),
                search_seconds=Histogram(
                    "agentbus_memory_search_seconds", "", ("outcome",), registry=self.metrics
                ),
            ),
            keys=KeyQueries(self.key_store),
        )

    @contextlib.asynccontextmanager
    async def broker(self) -> AsyncIterator[NatsBroker]:
        broker = create_broker("memory", BusSettings())
        broker.include_router(routes.build_router(Settings()))
        broker.context.set_global(routes.RECORDER, self.uses.recorder)
        broker.context.set_global(routes.TASKS, self.uses.tasks)
        broker.context.set_global(routes.SEMANTIC, self.uses.semantic)
        broker.context.set_global(routes.KEYS, self.uses.keys)
        async with TestNatsBroker(broker) as br:
            yield br

    def searches(self, outcome: str) -> float:
        count = self.metrics.get_sample_value(
            "agentbus_memory_search_seconds_count", {"outcome": outcome}
        )
        return count or 0.0


R = TypeVar("R", bound=BaseModel)


async def ask(br: NatsBroker, subject: str, request: BaseModel, reply: type[R]) -> R:
    msg = await br.request(request.model_dump(mode="json"), subject, timeout=WAIT_S)
    return reply.model_validate_json(msg.body)


def a_finished_task(
    task_id: str, *, at: datetime = T0, cost: float = 0.01, tenant: str = ""
) -> list[Any]:
    return [
        TaskSubmitted(task_id=task_id, goal=f"goal of {task_id}", tenant=tenant, occurred_at=at),
        PlanCreated(task_id=task_id, steps=[STEP], occurred_at=at),
        StepReady(task_id=task_id, step=STEP, goal="g", occurred_at=at),
        StepCompleted(task_id=task_id, step_id=STEP.id, output="found it", occurred_at=at),
        TaskCompleted(task_id=task_id, answer="42", usage=spend("model-a", cost), occurred_at=at),
    ]


# --- task queries --------------------------------------------------------------------


async def test_history_of_a_task_has_its_summary_steps_and_events_in_order() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    events = a_finished_task(task_id)
    rig.log.add(*events)
    async with rig.broker() as br:
        reply = await ask(
            br, subjects.MEMORY_TASK_HISTORY, TaskHistoryRequest(task_id=task_id), TaskHistoryReply
        )
    assert reply.ok, reply.error
    assert reply.task is not None
    assert (reply.task.status, reply.task.answer) == (TaskStatus.COMPLETED, "42")
    assert [(s.id, s.status.value, s.output) for s in reply.steps] == [
        ("s1", "completed", "found it")
    ]
    assert [e.event_id for e in reply.events] == [e.event_id for e in events]


async def test_history_of_an_unknown_task_says_so() -> None:
    task_id = new_id("tsk")
    async with Rig().broker() as br:
        reply = await ask(
            br, subjects.MEMORY_TASK_HISTORY, TaskHistoryRequest(task_id=task_id), TaskHistoryReply
        )
    assert not reply.ok
    assert reply.error == f"unknown task {task_id}"
    assert reply.task is None and reply.events == []


async def test_tasks_are_listed_newest_first_and_by_status() -> None:
    rig = Rig()
    older, newer, running = new_id("tsk"), new_id("tsk"), new_id("tsk")
    rig.log.add(*a_finished_task(older, at=T0), *a_finished_task(newer, at=T0 + timedelta(1)))
    rig.log.add(TaskSubmitted(task_id=running, goal="still going", occurred_at=T0))
    async with rig.broker() as br:
        done = await ask(
            br,
            subjects.MEMORY_TASK_LIST,
            TaskListRequest(status=TaskStatus.COMPLETED),
            TaskListReply,
        )
        first = await ask(br, subjects.MEMORY_TASK_LIST, TaskListRequest(limit=1), TaskListReply)
    assert [t.task_id for t in done.tasks] == [newer, older]
    assert [t.task_id for t in first.tasks] == [newer]


async def test_costs_add_up_by_model_and_list_the_costliest_task_first() -> None:
    rig = Rig()
    cheap, dear = new_id("tsk"), new_id("tsk")
    rig.log.add(*a_finished_task(cheap, cost=0.01), *a_finished_task(dear, cost=0.5))
    async with rig.broker() as br:
        reply = await ask(br, subjects.MEMORY_COSTS, CostsRequest(top_tasks=1), CostsReply)
    assert reply.ok, reply.error
    assert reply.tasks == 2
    assert reply.total.cost_usd == pytest.approx(0.51)
    assert reply.by_model["model-a"].calls == 2
    assert [t.task_id for t in reply.by_task] == [dear]


QUERIES: list[tuple[str, BaseModel, type[Reply], str]] = [
    (
        subjects.MEMORY_TASK_HISTORY,
        TaskHistoryRequest(task_id=new_id("tsk")),
        TaskHistoryReply,
        "cannot read task history: ",
    ),
    (subjects.MEMORY_TASK_LIST, TaskListRequest(), TaskListReply, "cannot list tasks: "),
    (subjects.MEMORY_COSTS, CostsRequest(), CostsReply, "cannot total costs: "),
    (
        subjects.MEMORY_KEYS_CREATE,
        KeyCreateRequest(tenant="acme", key_hash="a" * 64, prefix="agb_x"),
        KeyCreateReply,
        "cannot create the key: ",
    ),
    (subjects.MEMORY_KEYS_LIST, KeyListRequest(), KeyListReply, "cannot list keys: "),
    (
        subjects.MEMORY_KEYS_REVOKE,
        KeyRevokeRequest(key_id="key_1"),
        KeyRevokeReply,
        "cannot revoke the key: ",
    ),
    (
        subjects.MEMORY_KEYS_VERIFY,
        KeyVerifyRequest(key_hash="a" * 64),
        KeyVerifyReply,
        "cannot check the key: ",
    ),
]


@pytest.mark.parametrize(("subject", "request_", "reply_type", "prefix"), QUERIES)
async def test_a_query_while_the_database_is_away_gets_the_reason(
    subject: str, request_: BaseModel, reply_type: type[Reply], prefix: str
) -> None:
    rig = Rig()
    rig.log.down = rig.key_store.down = "connection refused"
    async with rig.broker() as br:
        reply = await ask(br, subject, request_, reply_type)
    assert not reply.ok
    assert reply.error == f"{prefix}connection refused"


# --- tenants: a request naming one sees only its tasks ----------------------------------


async def test_a_tenant_sees_only_its_own_tasks_and_no_tenant_sees_all() -> None:
    rig = Rig()
    ours, theirs, local = new_id("tsk"), new_id("tsk"), new_id("tsk")
    rig.log.add(*a_finished_task(ours, cost=0.25, tenant="acme"))
    rig.log.add(*a_finished_task(theirs, cost=0.5, tenant="globex"))
    rig.log.add(*a_finished_task(local, cost=0.125))  # submitted on the bus: no tenant
    async with rig.broker() as br:
        listed = await ask(
            br, subjects.MEMORY_TASK_LIST, TaskListRequest(tenant="acme"), TaskListReply
        )
        every = await ask(br, subjects.MEMORY_TASK_LIST, TaskListRequest(), TaskListReply)
        costs = await ask(br, subjects.MEMORY_COSTS, CostsRequest(tenant="acme"), CostsReply)
        own = await ask(
            br,
            subjects.MEMORY_TASK_HISTORY,
            TaskHistoryRequest(task_id=ours, tenant="acme"),
            TaskHistoryReply,
        )
    assert [t.task_id for t in listed.tasks] == [ours]
    assert {t.task_id for t in every.tasks} == {ours, theirs, local}
    assert (costs.tasks, [t.task_id for t in costs.by_task]) == (1, [ours])
    assert costs.total.cost_usd == pytest.approx(0.25)
    assert own.ok and own.task is not None and own.task.task_id == ours


@pytest.mark.parametrize("whose", ["globex", ""], ids=["another tenant", "no tenant"])
async def test_another_tenants_task_looks_exactly_like_an_unknown_one(whose: str) -> None:
    rig = Rig()
    theirs, unknown = new_id("tsk"), new_id("tsk")
    rig.log.add(*a_finished_task(theirs, tenant=whose))
    async with rig.broker() as br:
        hidden = await ask(
            br,
            subjects.MEMORY_TASK_HISTORY,
            TaskHistoryRequest(task_id=theirs, tenant="acme"),
            TaskHistoryReply,
        )
        missing = await ask(
            br,
            subjects.MEMORY_TASK_HISTORY,
            TaskHistoryRequest(task_id=unknown, tenant="acme"),
            TaskHistoryReply,
        )
    assert (hidden.ok, hidden.error) == (False, f"unknown task {theirs}")
    assert (missing.ok, missing.error) == (False, f"unknown task {unknown}")
    assert hidden.model_dump(exclude={"error"}) == missing.model_dump(exclude={"error"})


# --- API keys --------------------------------------------------------------------------


async def test_a_key_is_created_verified_listed_and_refused_once_revoked() -> None:
    rig = Rig()
    key, key_hash, prefix = new_key()
    async with rig.broker() as br:
        created = await ask(
            br,
            subjects.MEMORY_KEYS_CREATE,
            KeyCreateRequest(tenant="acme", key_hash=key_hash, prefix=prefix),
            KeyCreateReply,
        )
        assert created.ok and created.key is not None, created.error
        key_id = created.key.key_id
        verified = await ask(
            br, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
        )
        listed = await ask(
            br, subjects.MEMORY_KEYS_LIST, KeyListRequest(tenant="acme"), KeyListReply
        )
        others = await ask(
            br, subjects.MEMORY_KEYS_LIST, KeyListRequest(tenant="globex"), KeyListReply
        )
        revoked = await ask(
            br, subjects.MEMORY_KEYS_REVOKE, KeyRevokeRequest(key_id=key_id), KeyRevokeReply
        )
        again = await ask(
            br, subjects.MEMORY_KEYS_REVOKE, KeyRevokeRequest(key_id=key_id), KeyRevokeReply
        )
        refused = await ask(
            br, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
        )
        after = await ask(br, subjects.MEMORY_KEYS_LIST, KeyListRequest(), KeyListReply)
    assert (created.key.tenant, created.key.prefix, created.key.revoked_at) == (
        "acme",
        prefix,
        None,
    )
    assert key.startswith(prefix) and len(prefix) <= 16
    assert (verified.ok, verified.key_id, verified.tenant) == (True, key_id, "acme")
    assert [k.key_id for k in listed.keys] == [key_id]
    assert others.keys == []
    assert (revoked.ok, revoked.revoked) == (True, True)
    assert (again.ok, again.revoked) == (True, False)  # revoked already: nothing to do
    assert refused.refused  # a refusal, not memory failing to check
    assert (refused.ok, refused.error, refused.key_id, refused.tenant) == (
        False,
        "unknown or revoked key",
        "",
        "",
    )
    (listed_after,) = after.keys
    assert listed_after.revoked_at is not None


async def test_an_unknown_key_is_refused_and_revoking_one_revokes_nothing() -> None:
    _, key_hash, _ = new_key()
    async with Rig().broker() as br:
        refused = await ask(
            br, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
        )
        revoked = await ask(
            br, subjects.MEMORY_KEYS_REVOKE, KeyRevokeRequest(key_id="key_nope"), KeyRevokeReply
        )
    assert (refused.ok, refused.error) == (False, "unknown or revoked key")
    assert (revoked.ok, revoked.revoked) == (True, False)


async def test_a_duplicate_key_hash_is_refused_and_the_first_key_stays() -> None:
    rig = Rig()
    _, key_hash, prefix = new_key()
    async with rig.broker() as br:
        first = await ask(
            br,
            subjects.MEMORY_KEYS_CREATE,
            KeyCreateRequest(tenant="acme", key_hash=key_hash, prefix=prefix),
            KeyCreateReply,
        )
        second = await ask(
            br,
            subjects.MEMORY_KEYS_CREATE,
            KeyCreateRequest(tenant="globex", key_hash=key_hash, prefix=prefix),
            KeyCreateReply,
        )
        verified = await ask(
            br, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
        )
    assert first.ok and first.key is not None
    assert (second.ok, second.key) == (False, None)
    assert second.error is not None and "stored already" in second.error
    assert (verified.tenant, verified.key_id) == ("acme", first.key.key_id)


async def test_a_key_hash_is_never_logged() -> None:
    rig = Rig()
    _, key_hash, prefix = new_key()
    with structlog.testing.capture_logs() as logs:
        async with rig.broker() as br:
            created = await ask(
                br,
                subjects.MEMORY_KEYS_CREATE,
                KeyCreateRequest(tenant="acme", key_hash=key_hash, prefix=prefix),
                KeyCreateReply,
            )
            assert created.key is not None
            await ask(
                br, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
            )
            await ask(
                br,
                subjects.MEMORY_KEYS_REVOKE,
                KeyRevokeRequest(key_id=created.key.key_id),
                KeyRevokeReply,
            )
    assert [e["event"] for e in logs if e["event"].startswith("api key")] == [
        "api key created",
        "api key revoked",
    ]
    assert key_hash not in repr(logs)


async def test_readiness_is_the_database_answering() -> None:
    rig = Rig()
    assert await rig.uses.tasks.ready()
    rig.log.down = "connection refused"
    assert not await rig.uses.tasks.ready()


# --- semantic memory -----------------------------------------------------------------


async def test_a_saved_memory_is_found_by_search_and_the_search_is_measured() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    async with rig.broker() as br:
        saved = await ask(
            br,
            subjects.MEMORY_SAVE,
            MemorySaveRequest(text="the launch code is blue", kind="fact", task_id=task_id),
            MemorySaveReply,
        )
        found = await ask(
            br,
            subjects.MEMORY_SEARCH,
            MemorySearchRequest(query="launch code", task_id=task_id),
            MemorySearchReply,
        )
    assert saved.ok and saved.memory_id is not None
    assert found.ok, found.error
    assert [(h.memory_id, h.text, h.kind) for h in found.hits] == [
        (saved.memory_id, "the launch code is blue", "fact")
    ]
    assert rig.searches("ok") == 1
    (span,) = [s for s in rig.spans.get_finished_spans() if s.name.endswith("search")]
    assert span.attributes is not None
    assert span.attributes[semconv.MEMORY_HITS] == 1
    assert span.attributes[semconv.MEMORY_OPERATION] == "search"


REFUSALS: list[tuple[str, Callable[[Rig], None], str]] = [
    ("text too long", lambda rig: None, "is 201 characters; memory accepts at most 200"),
    (
        "database away",
        lambda rig: setattr(rig.index, "failure", DatabaseUnavailable("connection refused")),
        "memory's database is unavailable: connection refused",
    ),
    (
        "model failing",
        lambda rig: setattr(rig.index, "failure", EmbeddingError("endpoint answered 503")),
        "cannot embed the text: endpoint answered 503",
    ),
]


@pytest.mark.parametrize(("case", "arrange", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_save_and_search_refuse_with_the_reason(
    case: str, arrange: Callable[[Rig], None], reason: str
) -> None:
    rig = Rig()
    arrange(rig)
    text = "x" * 201 if case == "text too long" else "a short text"
    async with rig.broker() as br:
        saved = await ask(br, subjects.MEMORY_SAVE, MemorySaveRequest(text=text), MemorySaveReply)
        found = await ask(
            br, subjects.MEMORY_SEARCH, MemorySearchRequest(query=text), MemorySearchReply
        )
    assert not saved.ok and saved.memory_id is None
    assert saved.error is not None and reason in saved.error
    assert not found.ok and found.hits == []
    assert found.error is not None and reason in found.error
    assert rig.index.memories == []
    assert (rig.searches("refused"), rig.searches("ok")) == (1, 0)


async def test_an_error_memory_cannot_explain_is_not_turned_into_a_refusal() -> None:
    rig = Rig()
    rig.index.failure = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        await rig.uses.semantic.answer_save(MemorySaveRequest(text="a text"))
    with pytest.raises(RuntimeError, match="a bug"):
        await rig.uses.semantic.answer_search(MemorySearchRequest(query="a text"))
    assert rig.searches("refused") == 0


# --- storing events (the batch consumer's use case) ----------------------------------


async def until(check: Callable[[], bool]) -> None:
    """Wait, bounded, for something the use case does in the background."""
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.001)


def batch(*events: Any, delivered: int = 1) -> list[FakeDelivery]:
    return [FakeDelivery.of(e, seq, delivered=delivered) for seq, e in enumerate(events, 1)]


async def test_a_good_batch_is_stored_in_one_write_and_every_message_acked() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    events = a_finished_task(task_id)
    deliveries = batch(*events)
    await rig.uses.recorder.store_events(deliveries)
    assert rig.log.writes == 1
    assert rig.log.types(task_id) == [e.event_type for e in events]
    assert [(d.acks, d.naks) for d in deliveries] == [(1, [])] * 5
    assert rig.dead_letters.letters == []


async def test_a_redelivered_batch_is_acked_and_stored_once() -> None:
    rig = Rig()
    events = a_finished_task(new_id("tsk"))
    await rig.uses.recorder.store_events(batch(*events))
    again = batch(*events, delivered=2)
    await rig.uses.recorder.store_events(again)
    assert len(rig.log.stored) == 5
    assert [d.acks for d in again] == [1] * 5


async def test_messages_that_can_never_be_stored_are_dead_lettered_at_once() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    first, last = a_finished_task(task_id)[:2]
    not_json = FakeDelivery(b"{this is not json", first.subject, 2, T0)
    body = json.dumps({"type": first.event_type, "task_id": task_id}).encode()  # no goal
    invalid = FakeDelivery(body, first.subject, 3, T0)
    deliveries = [FakeDelivery.of(first, 1), not_json, invalid, FakeDelivery.of(last, 4)]
    await rig.uses.recorder.store_events(deliveries)
    assert rig.log.types(task_id) == [first.event_type, last.event_type]
    assert rig.log.writes == 1
    letters = rig.dead_letters.letters
    assert [(x.delivery, x.deliveries) for x in letters] == [(not_json, 1), (invalid, 1)]
    assert f"invalid {first.event_type} event" in str(letters[1].error)
    assert [d.acks for d in deliveries] == [1, 1, 1, 1]


async def test_an_event_of_an_unknown_type_is_stored_as_it_came() -> None:
    rig = Rig()
    task_id, event_id = new_id("tsk"), new_id("evt")
    body = json.dumps({"type": "task.annotated", "task_id": task_id, "note": "newer writer"})
    subject = subjects.event_subject(task_id, "task.annotated")
    unknown = FakeDelivery(body.encode(), subject, 7, T0, msg_id=event_id)
    await rig.uses.recorder.store_events([unknown])
    (stored,) = rig.log.stored.values()
    assert (stored.record.event_id, stored.record.type) == (event_id, "task.annotated")
    assert stored.record.payload["note"] == "newer writer"
    assert unknown.acks == 1


async def test_an_outage_holds_the_batch_in_progress_until_the_database_is_back() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    events = a_finished_task(task_id)
    deliveries = batch(*events)
    rig.log.down = "the database system is shutting down"
    storing = asyncio.create_task(rig.uses.recorder.store_events(deliveries))
    try:
        # Retried, and kept in progress so JetStream neither redelivers nor counts it.
        await until(lambda: rig.log.attempts >= 3 and all(d.beats >= 2 for d in deliveries))
        assert not any(d.settled for d in deliveries)
        assert rig.dead_letters.letters == []
        assert rig.log.stored == {}

        rig.log.down = None
        async with asyncio.timeout(WAIT_S):
            await storing
    finally:
        storing.cancel()
    assert rig.log.types(task_id) == [e.event_type for e in events]
    assert rig.log.writes == 1
    assert [(d.acks, d.naks) for d in deliveries] == [(1, [])] * 5
    assert rig.dead_letters.letters == []


async def test_shutdown_during_an_outage_leaves_the_batch_unacked_for_redelivery() -> None:
    rig = Rig()
    deliveries = batch(*a_finished_task(new_id("tsk")))
    rig.log.down = "connection refused"
    storing = asyncio.create_task(rig.uses.recorder.store_events(deliveries))
    try:
        await until(lambda: rig.log.attempts >= 2)
        rig.uses.recorder.stop()
        async with asyncio.timeout(WAIT_S):
            await storing
    finally:
        storing.cancel()
    assert not any(d.settled for d in deliveries)
    assert rig.dead_letters.letters == []
    assert rig.log.stored == {}


async def test_a_bad_event_is_found_one_by_one_and_only_it_is_retried() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    events = a_finished_task(task_id)[:3]
    rig.log.rejects = {events[1].event_id}
    deliveries = batch(*events)
    await rig.uses.recorder.store_events(deliveries)
    assert rig.log.types(task_id) == [events[0].event_type, events[2].event_type]
    good_first, bad, good_last = deliveries
    assert (good_first.acks, good_last.acks) == (1, 1)
    assert (bad.acks, bad.naks) == (0, [rig.dead_letters.backoff(1)])
    assert rig.dead_letters.letters == []


async def test_a_bad_event_on_its_last_delivery_is_dead_lettered_and_acked() -> None:
    rig = Rig()
    task_id = new_id("tsk")
    events = a_finished_task(task_id)[:2]
    rig.log.rejects = {events[0].event_id}
    deliveries = batch(*events, delivered=MAX_DELIVER)
    await rig.uses.recorder.store_events(deliveries)
    bad = deliveries[0]
    assert rig.log.types(task_id) == [events[1].event_type]
    (letter,) = rig.dead_letters.letters
    assert (letter.delivery, letter.deliveries) == (bad, MAX_DELIVER)
    assert isinstance(letter.error, RejectedRow)
    assert [(d.acks, d.naks) for d in deliveries] == [(1, []), (1, [])]
