"""The memory service in-process against a real nats-server (JetStream) and a real
Postgres + pgvector: events in through the stream, task history out over request/reply."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker

from agentbus.cli import client
from agentbus.contracts import (
    CostsReply,
    CostsRequest,
    Event,
    HealthReply,
    HealthRequest,
    LLMCalled,
    ModelUsage,
    PlanCreated,
    PlanStep,
    StepCompleted,
    StepPaused,
    StepReady,
    StepToolCalled,
    TaskCompleted,
    TaskFailed,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    TaskPaused,
    TaskResumed,
    TaskStatus,
    TaskSubmitted,
    Usage,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream, publish_event, rpc
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, create_app, domain
from agentbus.memory.adapters import db as memory_db
from agentbus.memory.adapters.db import Database, migrations, run_migrations
from agentbus.memory.adapters.embeddings import LocalEmbedder, load_minilm
from agentbus.memory.usecases import TaskQueries
from tests.support import dead_letters, eventually

pytestmark = pytest.mark.integration

T = TypeVar("T")

WAIT_S = 20.0


# --- fixtures --------------------------------------------------------------------------


@functools.cache
def minilm() -> Any:
    """all-MiniLM-L6-v2, loaded once for every memory test module of the session."""
    return load_minilm()


# This module's own durable consumer: a replica of another module that stopped with a
# pull request still open on the server would otherwise hold events for ack_wait.
DURABLE = f"memory-events-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def memory(nats_url: str, database_url: str) -> AsyncIterator[FastStream]:
    """The memory app, started in this process as ``agentbus-memory`` would start it."""
    settings = Settings(
        database_url=database_url,
        events_durable=DURABLE,
        # ack_wait well under the tests' 30 s waits: on a busy machine FastStream's pull
        # loop can drop a partly fetched batch (nats-py raises a bare asyncio.TimeoutError
        # that FastStream does not catch); JetStream redelivers it after ack_wait.
        bus=BusSettings(nats_url=nats_url, retry_backoff_s=0.1, ack_wait_s=5),
    )
    app = create_app(settings, embedder=LocalEmbedder(load=minilm))
    async with TestApp(app):
        yield app
    async with client.connect(nats_url) as broker:
        js = jetstream(broker)
        await js.delete_consumer(subjects.EVENTS_STREAM, DURABLE)


@pytest.fixture(scope="module")
async def broker(nats_url: str, memory: FastStream) -> AsyncIterator[NatsBroker]:
    """A separate client broker, as the planner or the CLI would have."""
    async with client.connect(nats_url) as connected:
        yield connected


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


# --- helpers ---------------------------------------------------------------------------


async def settled(broker: NatsBroker, seq: int) -> None:
    """Wait until memory's durable consumer has acked everything up to stream ``seq``."""
    js = jetstream(broker)

    async def ack_floor() -> int:
        info = await js.consumer_info(subjects.EVENTS_STREAM, DURABLE)
        return info.ack_floor.stream_seq if info.ack_floor else 0

    await eventually(ack_floor, lambda floor: floor >= seq)


def usage(model: str, prompt: int, completion: int, calls: int, cost: float) -> Usage:
    return Usage.of(
        model,
        ModelUsage(prompt_tokens=prompt, completion_tokens=completion, calls=calls, cost_usd=cost),
    )


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


# --- tests -----------------------------------------------------------------------------


async def test_task_history_holds_the_events_in_order_and_the_completed_task(
    broker: NatsBroker, db: asyncpg.Connection
) -> None:
    task_id = new_id("tsk")
    step = PlanStep(id="s1", title="count", instructions="count to three")
    planning = usage("model-a", 100, 20, 1, 0.01)
    stepping = usage("model-a", 300, 40, 2, 0.03)
    total = planning + stepping + usage("model-b", 50, 10, 1, 0.005)  # + the answer call
    submitted = TaskSubmitted(task_id=task_id, goal="count to three")
    published = [
        submitted,
        PlanCreated(task_id=task_id, steps=[step], usage=planning),
        StepReady(task_id=task_id, step=step, goal=submitted.goal),
        StepToolCalled(task_id=task_id, step_id="s1", tool="run_python", summary="print(1,2,3)"),
        StepCompleted(task_id=task_id, step_id="s1", output="1 2 3", usage=stepping),
        TaskCompleted(task_id=task_id, answer="One, two, three.", usage=total),
    ]
    for event in published:
        await publish_event(broker, event)

    reply = await eventually(
        lambda: client.history(broker, task_id),
        lambda r: r.task is not None and r.task.status is TaskStatus.COMPLETED,
    )

    assert reply.ok and reply.error is None
    assert [e.event_id for e in reply.events] == [e.event_id for e in published]
    assert [e.type for e in reply.events] == [e.event_type for e in published]
    seqs = [e.seq for e in reply.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert reply.events[4].payload["output"] == "1 2 3"
    task = reply.task
    assert task is not None
    assert task.goal == "count to three"
    assert task.answer == "One, two, three."
    assert task.usage == total  # the task's total, not the sum of every event's usage
    assert task.usage.total.calls == 4
    assert task.created_at == submitted.occurred_at
    assert task.updated_at == published[-1].occurred_at

    assert [s.model_dump() for s in reply.steps] == [
        {
            "id": "s1",
            "title": "count",
            "status": "completed",
            "attempt": 1,
            "output": "1 2 3",
            "error": None,
            "usage": stepping.model_dump(),  # the step's own spend
        }
    ]

    row = await db.fetchrow("SELECT plan, steps FROM tasks WHERE task_id = $1", task_id)
    assert json.loads(row["plan"])["revision"] == 1
    (step_row,) = json.loads(row["steps"])
    assert step_row == {
        "id": "s1",
        "title": "count",
        "status": "completed",
        "attempt": 1,
        "output": "1 2 3",
        "error": None,
        "usage": stepping.model_dump(mode="json"),
    }


async def test_a_redelivered_event_is_stored_once_and_its_usage_counted_once(
    broker: NatsBroker,
) -> None:
    task_id = new_id("tsk")
    spent = usage("model-a", 10, 5, 1, 0.001)
    step_done = StepCompleted(task_id=task_id, step_id="s1", output="done", usage=spent)
    await publish_event(broker, TaskSubmitted(task_id=task_id, goal="twice"))
    first = await publish_event(broker, step_done)
    await settled(broker, first.seq)  # stored and folded in before it comes again
    # The same event again under another Nats-Msg-Id: JetStream's de-duplication does
    # not catch it (as after its window, or a producer that re-sent it), memory must.
    again = await broker.publish(
        step_done.model_dump(mode="json"),
        step_done.subject,
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": f"retry-{uuid.uuid4()}"},
    )
    assert not again.duplicate
    await settled(broker, again.seq)

    reply = await client.history(broker, task_id)
    assert [e.type for e in reply.events] == ["task.submitted", "step.completed"]
    assert reply.task is not None
    assert reply.task.usage == spent


async def test_bad_events_are_dead_lettered_with_a_reason_and_memory_keeps_serving(
    broker: NatsBroker,
) -> None:
    task_id = new_id("bad")
    subject = subjects.event_subject(task_id, "task.submitted")
    await broker.publish(b"{this is not json", subject, stream=subjects.EVENTS_STREAM)
    await broker.publish(
        {"type": "task.submitted", "task_id": task_id, "budget": {"max_steps": -1}},
        subject,
        stream=subjects.EVENTS_STREAM,
    )
    good = TaskSubmitted(task_id=task_id, goal="published after two bad ones")
    await publish_event(broker, good)

    reply = await eventually(lambda: client.history(broker, task_id), lambda r: r.ok)
    assert [e.event_id for e in reply.events] == [good.event_id]  # the bad ones are not stored
    assert reply.task is not None and reply.task.goal == good.goal

    js = jetstream(broker)
    letters = await eventually(
        lambda: dead_letters(js, "memory", subject), lambda found: len(found) >= 2
    )
    assert len(letters) == 2
    by_payload = {letter["payload"]: letter for letter in letters}
    not_json = by_payload["{this is not json"]
    assert "body is not JSON" in not_json["reason"]
    (invalid,) = (letter for p, letter in by_payload.items() if p != "{this is not json")
    assert "invalid task.submitted event" in invalid["reason"]
    assert "goal: Field required" in invalid["reason"]
    assert "budget.max_steps" in invalid["reason"]
    assert {letter["deliveries"] for letter in letters} == {1}  # at once, not after retries
    assert {letter["service"] for letter in letters} == {"memory"}


async def test_an_event_of_an_unknown_type_is_stored_as_it_came(broker: NatsBroker) -> None:
    task_id, event_id = new_id("tsk"), new_id("evt")
    newer = {
        "type": "task.annotated",  # from a writer newer than this memory
        "schema_version": 7,
        "event_id": event_id,
        "task_id": task_id,
        "occurred_at": "2026-11-02T10:00:00+00:00",
        "note": "kept, not understood",
    }
    await broker.publish(
        newer,
        subjects.event_subject(task_id, "task.annotated"),
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": event_id},
    )
    await publish_event(broker, TaskSubmitted(task_id=task_id, goal="after the unknown one"))

    reply = await eventually(lambda: client.history(broker, task_id), lambda r: len(r.events) == 2)
    unknown = reply.events[0]
    assert unknown.type == "task.annotated"
    assert unknown.event_id == event_id
    assert unknown.payload == newer
    assert unknown.occurred_at.isoformat() == "2026-11-02T10:00:00+00:00"
    assert reply.task is not None and reply.task.status is TaskStatus.SUBMITTED


async def test_history_of_an_unknown_task_says_so(broker: NatsBroker) -> None:
    task_id = new_id("tsk")
    reply = await client.history(broker, task_id)
    assert not reply.ok
    assert reply.error == f"unknown task {task_id}"
    assert reply.task is None and reply.events == []


async def test_a_malformed_history_request_gets_an_error_reply(broker: NatsBroker) -> None:
    msg = await broker.request(
        {"task_id": "not a valid id!"}, subjects.MEMORY_TASK_HISTORY, timeout=5
    )
    reply = TaskHistoryReply.model_validate_json(msg.body)
    assert not reply.ok
    assert reply.error is not None and "task_id" in reply.error


async def test_a_database_failure_gives_an_error_reply_not_a_crash(database_url: str) -> None:
    database = await Database.open(database_url, connect_retries=0)
    assert await database.ping()
    await database.close()  # every query now fails, as with a lost database

    assert not await database.ping()
    reply = await TaskQueries(database).answer_history(TaskHistoryRequest(task_id=new_id("tsk")))
    assert not reply.ok
    assert reply.error is not None and reply.error.startswith("cannot read task history: ")


async def test_health_reports_ready_when_the_database_answers(broker: NatsBroker) -> None:
    reply = await rpc(
        broker, subjects.health_subject("memory"), HealthRequest(), HealthReply, timeout=5
    )
    assert reply.service == "memory"
    assert reply.status == "ok"


async def test_migrations_apply_once_even_when_run_concurrently(database_url: str) -> None:
    admin = await asyncpg.connect(database_url)
    name = f"mig_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(database_url, name)
        expected = [m.version for m in migrations()]

        runs = await asyncio.gather(*(run_migrations(dsn) for _ in range(3)))
        assert sorted(runs, key=len) == [[], [], expected]  # one replica applied them
        assert await run_migrations(dsn) == []  # and again later: nothing to do

        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
            )
            vector = await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
        finally:
            await conn.close()
        assert [r["version"] for r in rows] == expected
        assert {r["tablename"] for r in tables} >= {"events", "tasks", "schema_migrations"}
        assert vector == 1
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# --- queries for people ----------------------------------------------------------------


async def test_tasks_are_listed_by_status_and_time_and_costs_add_up(broker: NatsBroker) -> None:
    # Three tasks on three days of their own, far from every other test's tasks.
    day0 = datetime(2031, 1, 1, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 10_000)
    days = [day0 + timedelta(days=i, hours=9) for i in range(3)]
    ids = [new_id("tsk") for _ in days]
    events = [
        TaskSubmitted(task_id=ids[0], goal="done", occurred_at=days[0]),
        TaskCompleted(
            task_id=ids[0],
            answer="yes",
            usage=usage("model-a", 1000, 100, 2, 0.5),
            occurred_at=days[0] + timedelta(minutes=5),
        ),
        TaskSubmitted(task_id=ids[1], goal="broke", occurred_at=days[1]),
        TaskFailed(
            task_id=ids[1],
            reason="boom",
            usage=usage("model-a", 100, 10, 1, 0.1) + usage("model-b", 50, 5, 1, 0.2),
            occurred_at=days[1] + timedelta(minutes=1),
        ),
        TaskSubmitted(task_id=ids[2], goal="running", occurred_at=days[2]),
        PlanCreated(
            task_id=ids[2],
            steps=[PlanStep(id="s1", title="t", instructions="i")],
            usage=usage("model-b", 10, 1, 1, 0.05),
            occurred_at=days[2] + timedelta(seconds=1),
        ),
    ]
    last = None
    for event in events:
        last = await publish_event(broker, event)
    assert last is not None
    await settled(broker, last.seq)

    async def listed(**filters: Any) -> list[str]:
        window: dict[str, Any] = {"since": day0, "until": day0 + timedelta(days=3)}
        request = TaskListRequest.model_validate({**window, **filters})
        reply = await rpc(broker, subjects.MEMORY_TASK_LIST, request, TaskListReply, timeout=5)
        assert reply.ok, reply.error
        return [t.task_id for t in reply.tasks]

    assert await listed() == [ids[2], ids[1], ids[0]]  # newest first
    assert await listed(status=TaskStatus.COMPLETED) == [ids[0]]
    assert await listed(status=TaskStatus.PLANNED) == [ids[2]]
    assert await listed(limit=2) == [ids[2], ids[1]]
    assert await listed(since=days[1]) == [ids[2], ids[1]]
    assert await listed(until=days[1]) == [ids[0]]

    async def costs(since: datetime, until: datetime) -> CostsReply:
        request = CostsRequest(since=since, until=until)
        reply = await rpc(broker, subjects.MEMORY_COSTS, request, CostsReply, timeout=5)
        assert reply.ok, reply.error
        return reply

    report = await costs(day0, day0 + timedelta(days=3))
    assert report.tasks == 3
    assert report.by_model["model-a"].cost_usd == pytest.approx(0.6)
    assert report.by_model["model-a"].prompt_tokens == 1100
    assert report.by_model["model-a"].calls == 3
    assert report.by_model["model-b"].cost_usd == pytest.approx(0.25)
    assert report.total.cost_usd == pytest.approx(0.85)
    assert report.total.completion_tokens == 116
    assert [t.task_id for t in report.by_task] == ids  # 0.5, 0.3, 0.05
    assert report.by_task[1].usage.total.cost_usd == pytest.approx(0.3)

    later = await costs(days[1], day0 + timedelta(days=3))
    assert later.tasks == 2
    assert later.total.cost_usd == pytest.approx(0.35)
    assert set(later.by_model) == {"model-a", "model-b"}
    empty = await costs(day0 - timedelta(days=2), day0)
    assert (empty.tasks, empty.by_model, empty.by_task) == (0, {}, [])


async def test_a_malformed_list_request_gets_an_error_reply(broker: NatsBroker) -> None:
    msg = await broker.request({"limit": 0, "status": "nope"}, subjects.MEMORY_TASK_LIST, timeout=5)
    reply = TaskListReply.model_validate_json(msg.body)
    assert not reply.ok
    assert reply.error is not None and "limit" in reply.error and "status" in reply.error


async def test_the_cli_lists_tasks_and_costs(
    broker: NatsBroker,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agentbus.cli.tasks_cmd import add_parsers

    day = datetime(2041, 1, 1, 8, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 10_000)
    task_id = new_id("tsk")
    await publish_event(broker, TaskSubmitted(task_id=task_id, goal="cli goal", occurred_at=day))
    done = await publish_event(
        broker,
        TaskCompleted(
            task_id=task_id, answer="a", usage=usage("model-z", 7, 3, 1, 0.125), occurred_at=day
        ),
    )
    await settled(broker, done.seq)
    monkeypatch.setenv("AGENTBUS_NATS_URL", nats_url)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    window = ["--since", day.date().isoformat(), "--until", (day + timedelta(days=1)).isoformat()]

    args = parser.parse_args(["tasks", "list", "--status", "completed", *window])
    assert await args.handler(args) == 0
    out = capsys.readouterr().out
    assert task_id in out and "completed" in out and "0.1250" in out and "cli goal" in out

    args = parser.parse_args(["costs", *window])
    assert await args.handler(args) == 0
    out = capsys.readouterr().out
    assert "1 task(s)" in out
    assert "model-z" in out and "0.1250" in out and task_id in out

    args = parser.parse_args(["costs", "--json", *window])
    assert await args.handler(args) == 0
    out = capsys.readouterr().out  # service logs share stdout in tests: find the JSON
    report = CostsReply.model_validate_json(out[out.index("{\n") :])
    assert report.total.cost_usd == pytest.approx(0.125)


# --- spend control: LLM calls, budget pauses and approvals -------------------------------


def call(task_id: str, model: str, cost: float, at: datetime, **fields: Any) -> LLMCalled:
    spent = ModelUsage(prompt_tokens=100, completion_tokens=10, calls=1, cost_usd=cost)
    return LLMCalled(task_id=task_id, model=model, usage=spent, occurred_at=at, **fields)


async def test_llm_calls_are_stored_once_and_costs_count_every_call_of_the_planner_too(
    broker: NatsBroker, db: asyncpg.Connection
) -> None:
    day = datetime(2051, 1, 1, 8, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 10_000)
    running, older = new_id("tsk"), new_id("tsk")
    step = PlanStep(id="s1", title="t", instructions="i")
    planning = LLMCalled(
        task_id=running,
        role="planner",
        conversation="planner/plan",
        model="model-p",
        usage=ModelUsage(
            prompt_tokens=1000, completion_tokens=200, cached_tokens=100, calls=1, cost_usd=0.25
        ),
        reserved_tokens=5000,
        reserved_cost_usd=1.5,
        duration_ms=812.5,
        occurred_at=day + timedelta(seconds=1),
    )
    stepping = call(
        running, "model-e", 0.5, day + timedelta(seconds=3), role="executor", step_id="s1"
    )
    # The planner's answer call: made, but the task has not completed yet.
    answering = call(running, "model-p", 0.0625, day + timedelta(seconds=5), role="planner")
    events: list[Event] = [
        TaskSubmitted(task_id=running, goal="running", occurred_at=day),
        planning,
        PlanCreated(
            task_id=running,
            steps=[step],
            usage=Usage.of("model-p", planning.usage),  # the same call, not counted twice
            occurred_at=day + timedelta(seconds=2),
        ),
        StepReady(task_id=running, step=step, goal="running", occurred_at=day),
        stepping,
        StepCompleted(
            task_id=running,
            step_id="s1",
            output="o",
            usage=Usage.of("model-e", stepping.usage),
            occurred_at=day + timedelta(seconds=4),
        ),
        answering,
        # A task from before memory recorded LLM calls: its reported usage stands in.
        TaskSubmitted(task_id=older, goal="older", occurred_at=day + timedelta(hours=1)),
        TaskCompleted(
            task_id=older,
            answer="a",
            usage=usage("model-e", 10, 5, 1, 0.125),
            occurred_at=day + timedelta(hours=1),
        ),
    ]
    for event in events:
        await publish_event(broker, event)
    again = await broker.publish(  # the planning call again, past JetStream's de-duplication
        planning.model_dump(mode="json"),
        planning.subject,
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": f"retry-{uuid.uuid4()}"},
    )
    assert not again.duplicate
    await settled(broker, again.seq)

    rows = await db.fetch(
        "SELECT * FROM llm_calls WHERE task_id = $1 ORDER BY occurred_at", running
    )
    assert [r["event_id"] for r in rows] == [
        planning.event_id,
        stepping.event_id,
        answering.event_id,
    ]
    assert dict(rows[0]) == {
        "event_id": planning.event_id,
        "task_id": running,
        "step_id": "",
        "role": "planner",
        "conversation": "planner/plan",
        "model": "model-p",
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cached_tokens": 100,
        "cost_usd": 0.25,
        "reserved_tokens": 5000,
        "reserved_cost_usd": 1.5,
        "duration_ms": 812.5,
        "occurred_at": planning.occurred_at,
    }
    assert (rows[1]["step_id"], rows[1]["role"]) == ("s1", "executor")
    history = await client.history(broker, running)
    assert [e.type for e in history.events].count("llm.called") == 3
    # tasks show / list: the spend so far is every call made, the answer call included
    # (the lifecycle events report it only once the task completes).
    assert history.task is not None
    assert history.task.usage.total.cost_usd == pytest.approx(0.8125)
    assert history.task.usage.by_model["model-p"].calls == 2
    listed = await rpc(
        broker,
        subjects.MEMORY_TASK_LIST,
        TaskListRequest(since=day, until=day + timedelta(days=1)),
        TaskListReply,
        timeout=5,
    )
    assert {t.task_id: round(t.usage.total.cost_usd, 4) for t in listed.tasks} == {
        running: 0.8125,
        older: 0.125,
    }

    request = CostsRequest(since=day, until=day + timedelta(days=1))
    report = await rpc(broker, subjects.MEMORY_COSTS, request, CostsReply, timeout=5)
    assert report.ok, report.error
    assert report.tasks == 2
    assert report.by_model["model-p"] == ModelUsage(
        prompt_tokens=1100, completion_tokens=210, cached_tokens=100, calls=2, cost_usd=0.3125
    )
    assert report.by_model["model-e"] == ModelUsage(
        prompt_tokens=110, completion_tokens=15, calls=2, cost_usd=0.625
    )
    assert report.total.cost_usd == pytest.approx(0.9375)
    assert [t.task_id for t in report.by_task] == [running, older]  # costliest first
    assert [t.usage.total.cost_usd for t in report.by_task] == pytest.approx([0.8125, 0.125])
    assert report.by_task[0].status is TaskStatus.RUNNING
    assert report.by_task[0].usage.by_model["model-p"].calls == 2


def paused(task_id: str, round_: int = 0) -> TaskPaused:
    """The planner's decision after a pausing BudgetExhausted."""
    return TaskPaused(
        task_id=task_id,
        reason="cost budget exhausted",
        approval_deadline=datetime.now(UTC) + timedelta(hours=1),
        round=round_,
    )


async def test_a_task_paused_by_its_budget_awaits_approval_and_its_step_resumes(
    broker: NatsBroker,
) -> None:
    task_id = new_id("tsk")
    step = PlanStep(id="s1", title="count", instructions="count")
    first, second = usage("model-a", 100, 10, 2, 0.25), usage("model-a", 50, 5, 1, 0.125)
    events: list[Event] = [
        TaskSubmitted(task_id=task_id, goal="count"),
        PlanCreated(task_id=task_id, steps=[step]),
        StepReady(task_id=task_id, step=step, goal="count"),
        paused(task_id),
        StepPaused(task_id=task_id, step_id="s1", reason="cost budget exhausted", usage=first),
        TaskResumed(task_id=task_id, round=0),  # the planner's answer to the approval
        StepReady(task_id=task_id, step=step, goal="count", attempt=2),
        StepCompleted(task_id=task_id, step_id="s1", output="3", usage=second, attempt=2),
    ]
    seen: list[tuple[str, str]] = []
    history: TaskHistoryReply | None = None
    for event in events:
        await settled(broker, (await publish_event(broker, event)).seq)
        history = await client.history(broker, task_id)
        assert history.task is not None
        seen.append((history.task.status.value, history.steps[0].status if history.steps else ""))
        if isinstance(event, StepPaused):
            waiting = TaskListRequest(status=TaskStatus.AWAITING_APPROVAL, limit=1000)
            listed = await rpc(broker, subjects.MEMORY_TASK_LIST, waiting, TaskListReply, timeout=5)
            assert task_id in [t.task_id for t in listed.tasks]
    assert seen == [
        ("submitted", ""),
        ("planned", "pending"),
        ("running", "running"),
        ("awaiting_approval", "running"),
        ("awaiting_approval", "paused"),
        ("running", "paused"),
        ("running", "running"),
        ("running", "completed"),
    ]
    assert history is not None and history.task is not None
    (done,) = history.steps
    assert (done.attempt, done.output, done.error) == (2, "3", None)
    assert done.usage == first + second  # the paused attempt's spend counts too
    assert history.task.usage == first + second


async def test_a_late_event_replays_the_task_and_keeps_its_pause(
    database_url: str, db: asyncpg.Connection
) -> None:
    task_id = new_id("tsk")
    step = PlanStep(id="s1", title="t", instructions="i")
    paused_usage = usage("model-a", 10, 1, 1, 0.5)
    llm = call(task_id, "model-a", 0.5, datetime.now(UTC), role="executor", step_id="s1")
    by_seq: dict[int, Event] = {
        1: TaskSubmitted(task_id=task_id, goal="g"),
        2: PlanCreated(task_id=task_id, steps=[step]),
        3: StepReady(task_id=task_id, step=step, goal="g"),
        4: StepPaused(task_id=task_id, step_id="s1", reason="budget", usage=paused_usage),
        5: paused(task_id),
        6: llm,
        7: TaskResumed(task_id=task_id),
    }

    async def record(database: Database, seq: int) -> None:
        event = by_seq[seq]
        incoming = domain.read_event(
            event.model_dump_json().encode(),
            subject=event.subject,
            stream_seq=seq,
            received_at=datetime.now(UTC),
        )
        assert await database.record(incoming.record, incoming.event)

    database = await Database.open(database_url, connect_retries=0)
    try:
        for seq in (1, 2, 3, 5, 6):
            await record(database, seq)
        projection, _ = await database.task_history(task_id)
        assert projection is not None and projection.status is TaskStatus.AWAITING_APPROVAL
        await record(database, 4)  # late: the task is replayed from its stored events
        projection, events = await database.task_history(task_id)
        assert projection is not None
        assert projection.status is TaskStatus.AWAITING_APPROVAL  # the pause was replayed
        assert projection.steps[0].status == "paused"
        stored = await db.fetchval("SELECT usage FROM tasks WHERE task_id = $1", task_id)
        assert Usage.model_validate_json(stored) == paused_usage  # counted once, replayed
        assert projection.usage == Usage.of("model-a", llm.usage)  # shown: every call made
        assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
        await record(database, 7)
        projection, _ = await database.task_history(task_id)
        assert projection is not None and projection.status is TaskStatus.RUNNING
    finally:
        await database.close()


async def test_migrating_copies_llm_calls_an_older_memory_stored_as_unknown_events(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await asyncpg.connect(database_url)
    name = f"mig_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(database_url, name)
        every = migrations()
        monkeypatch.setattr(memory_db, "migrations", lambda: every[:2])  # a memory before 0003
        assert await run_migrations(dsn) == [1, 2]
        monkeypatch.setattr(memory_db, "migrations", lambda: every[:3])  # and one with it

        task_id = new_id("tsk")
        good = call(task_id, "model-a", 0.5, datetime(2026, 11, 2, tzinfo=UTC), role="planner")
        malformed = {
            "type": "llm.called",
            "event_id": new_id("evt"),
            "task_id": task_id,
            "model": "model-b",
            "usage": {"prompt_tokens": "lots", "cost_usd": -1, "completion_tokens": 1e30},
        }
        no_model = {"type": "llm.called", "event_id": new_id("evt"), "usage": {}}
        conn = await asyncpg.connect(dsn)
        try:
            for payload in (good.model_dump(mode="json"), malformed, no_model):
                await conn.execute(
                    "INSERT INTO events (event_id, task_id, type, subject, occurred_at, payload) "
                    "VALUES ($1, $2, 'llm.called', 's', $3, $4::jsonb)",
                    payload["event_id"],
                    task_id,
                    good.occurred_at,
                    json.dumps(payload),
                )
            assert await run_migrations(dsn) == [3]
            rows = await conn.fetch(
                "SELECT event_id, step_id, role, model, prompt_tokens, completion_tokens, "
                "cost_usd FROM llm_calls ORDER BY cost_usd DESC"
            )
        finally:
            await conn.close()
        assert [dict(r) for r in rows] == [
            {
                "event_id": good.event_id,
                "step_id": "",
                "role": "planner",
                "model": "model-a",
                "prompt_tokens": 100,
                "completion_tokens": 10,
                "cost_usd": 0.5,
            },
            {  # wrong types count as nothing; the migration does not stop for them
                "event_id": malformed["event_id"],
                "step_id": "",
                "role": "",
                "model": "model-b",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cost_usd": 0.0,
            },
        ]
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
