"""Postgres: start-up (retries, migrations, pool), the event log and task projections.

The only module that imports asyncpg. Logic lives in ``agentbus.memory.domain``; this
module reads and writes rows and keeps each event's effects in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import asyncpg
import structlog
from pgvector.asyncpg import register_vector
from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from agentbus.contracts import EVENT_TYPES, Event, StoredEvent, parse_event

from .. import domain
from ..domain import EventRecord, TaskProjection

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock keys. The one-key (bigint) and two-key (int, int) spaces do not
# overlap: migrations take the bigint "agentbus"; event writes take ("amem", hash(task)).
MIGRATIONS_LOCK: Final = int.from_bytes(b"agentbus", "big")
_TASK_LOCK_SPACE: Final = int.from_bytes(b"amem", "big")

# Worth waiting for at start-up: Postgres still starting, not listening yet, full.
_TRANSIENT: Final = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)
# Anything the database or the driver can raise for a query.
_DB_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")


class DatabaseUnavailable(Exception):
    """The database could not be reached or could not answer; the message says why."""


# --- migrations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The SQL files shipped in ``agentbus/memory/migrations``, oldest first."""
    found: dict[int, Migration] = {}
    for entry in resources.files("agentbus.memory").joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            continue
        version = int(match[1])
        if version in found:
            raise RuntimeError(f"two migrations with version {version}: {entry.name}")
        found[version] = Migration(version, match[2], entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply pending migrations; returns the versions applied now (empty: up to date).

    Everything runs in one transaction that first takes an advisory lock, so replicas
    starting together apply each migration once: the others wait, then find it done.
    """
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK)
        await conn.execute(_CREATE_MIGRATIONS_TABLE)
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in migrations():
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    return applied


async def run_migrations(dsn: str) -> list[int]:
    """Connect, migrate, disconnect (pgvector's codec needs the extension to exist first)."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


# --- connecting ----------------------------------------------------------------------


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without user or password, for messages and logs."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or parse_qs(parts.query).get("host", ["local socket"])[0]
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an unparsable database URL"
    return f"{host}{port}{parts.path}"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")
    await register_vector(conn)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    log.warning(
        "database not reachable yet; retrying",
        attempt=state.attempt_number,
        wait_s=round(state.upcoming_sleep, 2),
        error=f"{type(error).__name__}: {error}",
    )


class Database:
    """The memory service's Postgres: a connection pool and the queries it runs."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(
        cls,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_retries: int = 10,
        backoff_s: float = 0.5,
    ) -> Database:
        """Migrate, then open the pool; waits for a Postgres that is still starting."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(connect_retries + 1),
            wait=wait_exponential(multiplier=backoff_s, max=10),
            retry=retry_if_exception_type(_TRANSIENT),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            pool: asyncpg.Pool = await retrying(cls._connect, dsn, min_size, max_size)
        except _DB_ERRORS as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise DatabaseUnavailable(
                f"cannot use the database at {describe_dsn(dsn)} "
                f"(after {attempts} attempt(s)): {type(exc).__name__}: {exc}"
            ) from exc
        return cls(pool)

    @staticmethod
    async def _connect(dsn: str, min_size: int, max_size: int) -> asyncpg.Pool:
        applied = await run_migrations(dsn)
        if applied:
            log.info("applied database migrations", versions=applied)
        return await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=_init_connection
        )

    async def close(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout)
        except TimeoutError:
            log.warning("database connections still busy at shutdown; terminating them")
            self._pool.terminate()

    async def ping(self, timeout: float = 2.0) -> bool:
        """True when ``SELECT 1`` works: the readiness check."""
        try:
            async with asyncio.timeout(timeout):
                return bool(await self._pool.fetchval("SELECT 1") == 1)
        except _DB_ERRORS:
            return False

    # --- writes ----------------------------------------------------------------------

    async def record(self, record: EventRecord, event: Event | None) -> bool:
        """Store an event and fold it into its task, in one transaction.

        Returns False if the event was already stored (redelivery): then nothing changes,
        so its usage is never counted twice.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            # One writer per task at a time, across replicas: the fold reads, then writes.
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _TASK_LOCK_SPACE, record.task_id
            )
            inserted = await conn.fetchval(_INSERT_EVENT, *_event_values(record))
            if inserted and event is not None:
                await _project(conn, event, record.stream_seq)
        return bool(inserted)

    # --- reads -----------------------------------------------------------------------

    async def task_history(self, task_id: str) -> tuple[TaskProjection | None, list[StoredEvent]]:
        """A task's projection (None if none yet) and its stored events in stream order."""
        try:
            async with (
                self._pool.acquire(timeout=10) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                projection = await _load_projection(conn, task_id)
                rows = await conn.fetch(_TASK_EVENTS, task_id)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return projection, [_stored_event(r) for r in rows]


# --- queries -------------------------------------------------------------------------

_INSERT_EVENT = """
INSERT INTO events (event_id, task_id, type, subject, stream_seq, schema_version,
                    occurred_at, payload)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (event_id) DO NOTHING
RETURNING true
"""

_TASK_EVENTS = """
SELECT stream_seq, event_id, type, occurred_at, payload
FROM events
WHERE task_id = $1
ORDER BY stream_seq NULLS LAST, occurred_at
"""

_KNOWN_TASK_EVENTS = """
SELECT stream_seq, payload
FROM events
WHERE task_id = $1 AND type = ANY($2::text[])
ORDER BY stream_seq NULLS LAST, occurred_at
"""

_TASK_COLUMNS = (
    "task_id",
    "goal",
    "status",
    "plan",
    "steps",
    "answer",
    "error",
    "usage",
    "created_at",
    "updated_at",
    "last_seq",
)

_SELECT_TASK = f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE task_id = $1"  # noqa: S608

_UPSERT_TASK = f"""
INSERT INTO tasks ({", ".join(_TASK_COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(_TASK_COLUMNS) + 1))})
ON CONFLICT (task_id) DO UPDATE SET
{", ".join(f"{c} = EXCLUDED.{c}" for c in _TASK_COLUMNS[1:])}
"""  # noqa: S608 - built from the constant column list above, no input


def _event_values(record: EventRecord) -> Sequence[Any]:
    return (
        record.event_id,
        record.task_id,
        record.type,
        record.subject,
        record.stream_seq,
        record.schema_version,
        record.occurred_at,
        record.payload,
    )


async def _load_projection(conn: asyncpg.Connection, task_id: str) -> TaskProjection | None:
    row = await conn.fetchrow(_SELECT_TASK, task_id)
    return None if row is None else TaskProjection.from_row(row)


async def _project(conn: asyncpg.Connection, event: Event, seq: int) -> None:
    """Fold ``event`` into its task: on top of the projection if it is the newest event,
    else by replaying the task's stored history (it arrived late, e.g. after a retry)."""
    current = await _load_projection(conn, event.task_id)
    if domain.in_order(current, seq):
        updated = domain.apply(current, event, seq)
    else:
        log.debug("event arrived out of order; replaying the task", seq=seq)
        updated = domain.replay(await _known_history(conn, event.task_id))
    if updated is not None and updated != current:
        row = updated.to_row()
        await conn.execute(_UPSERT_TASK, *(row[c] for c in _TASK_COLUMNS))


async def _known_history(conn: asyncpg.Connection, task_id: str) -> list[tuple[int, Event]]:
    rows = await conn.fetch(_KNOWN_TASK_EVENTS, task_id, list(EVENT_TYPES))
    history: list[tuple[int, Event]] = []
    for row in rows:
        try:
            history.append((row["stream_seq"] or 0, parse_event(row["payload"])))
        except ValidationError as exc:  # stored by an older version; cannot fold it now
            log.warning("skipping a stored event that no longer parses", error=str(exc))
    return history


def _stored_event(row: asyncpg.Record) -> StoredEvent:
    occurred_at: datetime = row["occurred_at"]
    return StoredEvent(
        seq=row["stream_seq"] or 0,
        event_id=row["event_id"],
        type=row["type"],
        occurred_at=occurred_at,
        payload=row["payload"],
    )
