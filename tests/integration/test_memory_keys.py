"""Tenants and API keys in the memory service, in-process against a real nats-server
(JetStream) and a real Postgres + pgvector: keys created, verified, listed and revoked
over request/reply and by ``agentbus keys``; task queries filtered by tenant; the
migration on a database of the previous version."""

from __future__ import annotations

import argparse
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker
from pydantic import BaseModel

from agentbus.cli import client, keys_cmd
from agentbus.cli.keys import hash_key, new_key
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
    LLMCalled,
    ModelUsage,
    Reply,
    TaskCompleted,
    TaskHistoryReply,
    TaskHistoryRequest,
    TaskListReply,
    TaskListRequest,
    TaskSubmitted,
    Usage,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream, publish_event, rpc
from agentbus.core.settings import BusSettings
from agentbus.memory import Settings, create_app
from agentbus.memory.adapters import db as memory_db
from agentbus.memory.adapters.db import Database, migrations, run_migrations
from agentbus.memory.adapters.embeddings import LocalEmbedder
from tests.integration.test_memory_service import minilm, with_database
from tests.support import eventually

pytestmark = pytest.mark.integration

R = TypeVar("R", bound=Reply)

DURABLE = f"memory-keys-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def memory(nats_url: str, database_url: str) -> AsyncIterator[FastStream]:
    """The memory app, started in this process as ``agentbus-memory`` would start it."""
    settings = Settings(
        database_url=database_url,
        events_durable=DURABLE,
        bus=BusSettings(nats_url=nats_url, retry_backoff_s=0.1, ack_wait_s=5),
    )
    app = create_app(settings, embedder=LocalEmbedder(load=minilm))
    async with TestApp(app):
        yield app
    async with client.connect(nats_url) as broker:
        await jetstream(broker).delete_consumer(subjects.EVENTS_STREAM, DURABLE)


@pytest.fixture(scope="module")
async def broker(nats_url: str, memory: FastStream) -> AsyncIterator[NatsBroker]:
    async with client.connect(nats_url) as connected:
        yield connected


async def ask(broker: NatsBroker, subject: str, request: BaseModel, reply_type: type[R]) -> R:
    return await rpc(broker, subject, request, reply_type, timeout=5)


async def settled(broker: NatsBroker, seq: int) -> None:
    """Wait until memory's durable consumer has acked everything up to stream ``seq``."""
    js = jetstream(broker)

    async def ack_floor() -> int:
        info = await js.consumer_info(subjects.EVENTS_STREAM, DURABLE)
        return info.ack_floor.stream_seq if info.ack_floor else 0

    await eventually(ack_floor, lambda floor: floor >= seq)


def tenant_name() -> str:
    """A tenant of this test alone: the database is shared by the session."""
    return f"t-{uuid.uuid4().hex[:12]}"


# --- keys ------------------------------------------------------------------------------


async def test_a_key_is_created_verified_listed_and_refused_once_revoked(
    broker: NatsBroker,
) -> None:
    tenant = tenant_name()
    _, key_hash, prefix = new_key()
    created = await ask(
        broker,
        subjects.MEMORY_KEYS_CREATE,
        KeyCreateRequest(tenant=tenant, key_hash=key_hash, prefix=prefix),
        KeyCreateReply,
    )
    assert created.ok and created.key is not None, created.error
    key_id = created.key.key_id
    assert (created.key.tenant, created.key.prefix, created.key.revoked_at) == (
        tenant,
        prefix,
        None,
    )

    verify = KeyVerifyRequest(key_hash=key_hash)
    verified = await ask(broker, subjects.MEMORY_KEYS_VERIFY, verify, KeyVerifyReply)
    assert (verified.ok, verified.key_id, verified.tenant) == (True, key_id, tenant)

    _, second_hash, second_prefix = new_key()
    second = await ask(
        broker,
        subjects.MEMORY_KEYS_CREATE,
        KeyCreateRequest(tenant=tenant, key_hash=second_hash, prefix=second_prefix),
        KeyCreateReply,
    )
    assert second.key is not None
    listed = await ask(
        broker, subjects.MEMORY_KEYS_LIST, KeyListRequest(tenant=tenant), KeyListReply
    )
    assert [(k.key_id, k.prefix) for k in listed.keys] == [
        (key_id, prefix),
        (second.key.key_id, second_prefix),
    ]  # oldest first
    every = await ask(broker, subjects.MEMORY_KEYS_LIST, KeyListRequest(), KeyListReply)
    assert {key_id, second.key.key_id} <= {k.key_id for k in every.keys}

    revoke = KeyRevokeRequest(key_id=key_id)
    revoked = await ask(broker, subjects.MEMORY_KEYS_REVOKE, revoke, KeyRevokeReply)
    assert (revoked.ok, revoked.revoked) == (True, True)
    again = await ask(broker, subjects.MEMORY_KEYS_REVOKE, revoke, KeyRevokeReply)
    assert (again.ok, again.revoked) == (True, False)

    refused = await ask(broker, subjects.MEMORY_KEYS_VERIFY, verify, KeyVerifyReply)
    assert (refused.ok, refused.error, refused.key_id, refused.tenant) == (
        False,
        "unknown or revoked key",
        "",
        "",
    )
    still = await ask(
        broker, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=second_hash), KeyVerifyReply
    )
    assert (still.ok, still.key_id) == (True, second.key.key_id)  # only that key stopped
    after = await ask(
        broker, subjects.MEMORY_KEYS_LIST, KeyListRequest(tenant=tenant), KeyListReply
    )
    assert [k.revoked_at is not None for k in after.keys] == [True, False]


async def test_an_unknown_key_is_refused(broker: NatsBroker) -> None:
    _, key_hash, _ = new_key()
    reply = await ask(
        broker, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
    )
    assert (reply.ok, reply.error) == (False, "unknown or revoked key")


async def test_a_duplicate_key_hash_is_refused_and_the_first_key_stays(
    broker: NatsBroker,
) -> None:
    first_tenant, other_tenant = tenant_name(), tenant_name()
    _, key_hash, prefix = new_key()
    first = await ask(
        broker,
        subjects.MEMORY_KEYS_CREATE,
        KeyCreateRequest(tenant=first_tenant, key_hash=key_hash, prefix=prefix),
        KeyCreateReply,
    )
    again = await ask(
        broker,
        subjects.MEMORY_KEYS_CREATE,
        KeyCreateRequest(tenant=other_tenant, key_hash=key_hash, prefix=prefix),
        KeyCreateReply,
    )
    assert first.ok and first.key is not None
    assert (again.ok, again.key) == (False, None)
    assert again.error == "a key with this hash is stored already: generate a new key"
    verified = await ask(
        broker, subjects.MEMORY_KEYS_VERIFY, KeyVerifyRequest(key_hash=key_hash), KeyVerifyReply
    )
    assert (verified.tenant, verified.key_id) == (first_tenant, first.key.key_id)
    others = await ask(
        broker, subjects.MEMORY_KEYS_LIST, KeyListRequest(tenant=other_tenant), KeyListReply
    )
    assert others.keys == []


async def test_a_key_sent_in_place_of_its_hash_is_refused_and_never_repeated(
    broker: NatsBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _, _ = new_key()
    capsys.readouterr()
    msg = await broker.request({"key_hash": key}, subjects.MEMORY_KEYS_VERIFY, timeout=5)
    reply = KeyVerifyReply.model_validate_json(msg.body)
    assert not reply.ok
    assert reply.error is not None and "key_hash" in reply.error
    assert key not in msg.body.decode()
    # The service's logs share this process's output: the refusal is there, the key not.
    seen = capsys.readouterr()
    assert "rejected request" in seen.out + seen.err
    assert key not in seen.out + seen.err


# --- tenants ---------------------------------------------------------------------------


def spent(model: str, cost: float) -> Usage:
    return Usage.of(
        model, ModelUsage(prompt_tokens=10, completion_tokens=1, calls=1, cost_usd=cost)
    )


async def test_a_tenant_sees_only_its_tasks_in_lists_history_and_costs(
    broker: NatsBroker,
) -> None:
    # A day of its own, far from every other test's tasks.
    day = datetime(2071, 1, 1, 9, tzinfo=UTC) + timedelta(days=uuid.uuid4().int % 10_000)
    ours, theirs = tenant_name(), tenant_name()
    mine, other, local = new_id("tsk"), new_id("tsk"), new_id("tsk")
    call = LLMCalled(
        task_id=mine,
        role="planner",
        model="model-t",
        usage=ModelUsage(prompt_tokens=10, completion_tokens=1, calls=1, cost_usd=0.25),
        occurred_at=day,
    )
    events: list[Any] = [
        # The tenant's task: its TaskSubmitted comes last, as events may.
        call,
        TaskCompleted(task_id=mine, answer="a", usage=spent("model-t", 0.25), occurred_at=day),
        TaskSubmitted(task_id=mine, goal="ours", tenant=ours, occurred_at=day),
        TaskSubmitted(task_id=other, goal="theirs", tenant=theirs, occurred_at=day),
        TaskCompleted(task_id=other, answer="b", usage=spent("model-t", 0.5), occurred_at=day),
        TaskSubmitted(task_id=local, goal="on the bus", occurred_at=day),
    ]
    last = None
    for event in events:
        last = await publish_event(broker, event)
    assert last is not None
    await settled(broker, last.seq)
    window = {"since": day - timedelta(hours=1), "until": day + timedelta(hours=1)}

    async def listed(tenant: str | None) -> set[str]:
        request = TaskListRequest(tenant=tenant, **window)
        reply = await ask(broker, subjects.MEMORY_TASK_LIST, request, TaskListReply)
        assert reply.ok, reply.error
        return {t.task_id for t in reply.tasks}

    assert await listed(ours) == {mine}
    assert await listed(theirs) == {other}
    assert await listed(None) == {mine, other, local}

    async def history(task_id: str, tenant: str | None) -> TaskHistoryReply:
        request = TaskHistoryRequest(task_id=task_id, tenant=tenant)
        return await ask(broker, subjects.MEMORY_TASK_HISTORY, request, TaskHistoryReply)

    own = await history(mine, ours)
    assert own.ok and own.task is not None and own.task.goal == "ours"
    assert len(own.events) == 3
    unknown = new_id("tsk")
    for hidden, as_ in [(other, ours), (local, ours), (mine, theirs)]:
        reply = await history(hidden, as_)
        nothing = await history(unknown, as_)
        assert (reply.ok, reply.error) == (False, f"unknown task {hidden}")
        assert reply.model_dump(exclude={"error"}) == nothing.model_dump(exclude={"error"})
    assert (await history(other, None)).ok  # no tenant: every task

    async def costs(tenant: str | None) -> CostsReply:
        request = CostsRequest(tenant=tenant, **window)
        reply = await ask(broker, subjects.MEMORY_COSTS, request, CostsReply)
        assert reply.ok, reply.error
        return reply

    mine_only = await costs(ours)
    assert (mine_only.tasks, [t.task_id for t in mine_only.by_task]) == (1, [mine])
    assert mine_only.total.cost_usd == pytest.approx(0.25)  # its one recorded call
    assert (await costs(theirs)).total.cost_usd == pytest.approx(0.5)  # its reported usage
    every = await costs(None)
    assert every.tasks == 3
    assert every.total.cost_usd == pytest.approx(0.75)


# --- the CLI ---------------------------------------------------------------------------


async def test_the_cli_creates_lists_and_revokes_keys(
    broker: NatsBroker,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AGENTBUS_NATS_URL", nats_url)
    parser = argparse.ArgumentParser()
    keys_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    tenant = tenant_name()
    printed: list[str] = []

    async def run(*argv: str) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of one command (the service's logs among them)."""
        capsys.readouterr()
        args = parser.parse_args(list(argv))
        code = await args.handler(args)
        seen = capsys.readouterr()
        printed.extend((seen.out, seen.err))
        return code, seen.out, seen.err

    code, out, _ = await run("keys", "create", "--tenant", tenant)
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines() if line.startswith("key"))
    key, key_id = lines["key"].strip(), lines["key id"].strip()
    assert key.startswith("agb_") and len(key) == 4 + 43
    assert "shown only now" in out and f"tenant: {tenant}" in out

    # The gateway's check: the SHA-256 of the key it is shown.
    verify = KeyVerifyRequest(key_hash=hash_key(key))
    verified = await ask(broker, subjects.MEMORY_KEYS_VERIFY, verify, KeyVerifyReply)
    assert (verified.ok, verified.key_id, verified.tenant) == (True, key_id, tenant)

    code, out, _ = await run("keys", "list", "--tenant", tenant)
    assert code == 0
    (row,) = [line for line in out.splitlines() if line.startswith(key_id)]
    assert tenant in row and key[:12] in row and key not in out
    assert row.split()[-1] == "-"  # not revoked

    code, out, _ = await run("keys", "revoke", key_id)
    assert code == 0
    assert f"revoked {key_id}: memory refuses it from now on" in out.splitlines()
    refused = await ask(broker, subjects.MEMORY_KEYS_VERIFY, verify, KeyVerifyReply)
    assert not refused.ok

    code, _, err = await run("keys", "revoke", key_id)
    assert code == 1
    assert f"no key {key_id} to revoke" in err

    code, out, _ = await run("keys", "list", "--tenant", tenant, "--json")
    (listed,) = KeyListReply.model_validate_json(out[out.index("{\n") :]).keys
    assert (listed.key_id, listed.revoked_at is not None) == (key_id, True)

    code, _, err = await run("keys", "create", "--tenant", "not a name!")
    assert code == 2
    assert "tenant" in err
    assert hash_key(key) not in "".join(printed)  # nor logged by memory


# --- the migration ---------------------------------------------------------------------


async def test_the_migration_applies_to_a_database_of_the_previous_version(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = await asyncpg.connect(database_url)
    name = f"mig_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(database_url, name)
        every = migrations()
        monkeypatch.setattr(memory_db, "migrations", lambda: every[:3])  # before 0004
        assert await run_migrations(dsn) == [1, 2, 3]
        monkeypatch.undo()
        old = new_id("tsk")
        at = datetime(2026, 5, 1, tzinfo=UTC)
        conn = await asyncpg.connect(dsn)
        try:  # a task as the previous version stored it
            await conn.execute(
                "INSERT INTO tasks (task_id, goal, status, created_at, updated_at) "
                "VALUES ($1, 'old goal', 'completed', $2, $2)",
                old,
                at,
            )
            assert await run_migrations(dsn) == [4]
            tenant_of_old = await conn.fetchval("SELECT tenant FROM tasks WHERE task_id = $1", old)
            indexes = {
                r["indexname"]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE tablename IN ('tasks', 'api_keys')"
                )
            }
        finally:
            await conn.close()
        assert tenant_of_old == ""
        assert {"tasks_tenant_created_at", "api_keys_tenant"} <= indexes

        database = await Database.open(dsn, connect_retries=0)
        try:
            projection, _ = await database.task_history(old)
            assert projection is not None and projection.goal == "old goal"
            assert projection.tenant == ""
            hidden, events = await database.task_history(old, tenant="acme")
            assert (hidden, events) == (None, [])
            since, until = at - timedelta(days=1), at + timedelta(days=1)
            found = await database.list_tasks(status=None, since=since, until=until, limit=5)
            assert [p.task_id for p in found] == [old]
            acme = await database.list_tasks(
                status=None, since=since, until=until, limit=5, tenant="acme"
            )
            assert acme == []
            _, key_hash, prefix = new_key()
            key = await database.create_key(
                key_id=new_id("key"), tenant="acme", key_hash=key_hash, prefix=prefix
            )
            assert await database.verify_key(key_hash) == key
        finally:
            await database.close()
    finally:
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
