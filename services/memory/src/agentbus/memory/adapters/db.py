"""Postgres: start-up (retries, migrations, pool), the event log, task projections, the
record of LLM calls and the gateway's API keys.

The only module that imports asyncpg. Logic lives in ``agentbus.memory.domain``; this
module reads and writes rows and keeps each event's effects in one transaction.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

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

from agentbus.contracts import (
    Event,
    KeyInfo,
    LLMCalled,
    ModelUsage,
    StoredEvent,
    TaskCost,
    Usage,
    parse_event,
)

from .. import domain
from ..domain import EventRecord, TaskProjection
from ..ports import DatabaseUnavailable, DuplicateKey
from .dsn import describe_dsn
from .vector_check import check_vector_extension

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
# Errors that say nothing about the data: the server is down, restarting, shutting a
# connection, or a concurrent transaction lost. Trying the same write later succeeds.
_OUTAGE: Final = (
    *_TRANSIENT,
    asyncpg.InterfaceError,  # connection closed or reset under us
    asyncpg.OperatorInterventionError,  # 57P01 admin shutdown (restart, pg_terminate_backend)
    asyncpg.InsufficientResourcesError,
    asyncpg.TransactionRollbackError,  # serialization failure, deadlock detected
)

_MIGRATION_FILE = re.compile(r"(\d{4})_(\w+)\.sql")


class EmbeddingSpaceMismatch(RuntimeError):
    """The database holds embeddings of another model or dimension than the configured one."""


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
        server_log: Path | None = None,
    ) -> Database:
        """Self-check the vector extension, migrate, then open the pool; waits for a
        Postgres that is still starting. Raises ``VectorExtensionBroken`` (at once, not
        retried) when the extension cannot work here; ``server_log`` lets its message
        quote the server's crash line."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(connect_retries + 1),
            wait=wait_exponential(multiplier=backoff_s, max=10),
            retry=retry_if_exception_type(_TRANSIENT),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            pool: asyncpg.Pool = await retrying(cls._connect, dsn, min_size, max_size, server_log)
        except _DB_ERRORS as exc:
            attempts = retrying.statistics.get("attempt_number", 1)
            raise DatabaseUnavailable(
                f"cannot use the database at {describe_dsn(dsn)} "
                f"(after {attempts} attempt(s)): {type(exc).__name__}: {exc}"
            ) from exc
        return cls(pool)

    @staticmethod
    async def _connect(
        dsn: str, min_size: int, max_size: int, server_log: Path | None
    ) -> asyncpg.Pool:
        await check_vector_extension(dsn, server_log=server_log)
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
        """Store one event and fold it into its task (``record_batch`` of one)."""
        (stored,) = await self.record_batch([domain.Incoming(record, event)])
        return stored

    async def record_batch(self, items: Sequence[domain.Incoming]) -> list[bool]:
        """Store events, fold them into their tasks and keep each LLM call as a row of
        ``llm_calls``, all in one transaction.

        Returns, per item, whether it was stored now (False: already stored, a
        redelivery; then it changes nothing, so its usage is never counted twice).
        Raises ``DatabaseUnavailable`` for an outage (retry the same batch later) and
        lets any other database error through (something in the batch is wrong).
        """
        if not items:
            return []
        records = [item.record for item in items]
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # One writer per task at a time, across replicas: the fold reads, then
                # writes. Locks taken in one global order, so two batches never deadlock.
                await conn.execute(
                    _LOCK_TASKS, _TASK_LOCK_SPACE, sorted({r.task_id for r in records})
                )
                inserted = {
                    r["event_id"] for r in await conn.fetch(_INSERT_EVENTS, *_columns(records))
                }
                stored: list[bool] = []
                fresh: dict[str, list[tuple[int, Event]]] = {}
                calls: list[LLMCalled] = []
                for item in items:
                    event_id = item.record.event_id
                    new = event_id in inserted
                    inserted.discard(event_id)  # the same event twice in one batch: once
                    stored.append(new)
                    if not new or item.event is None:
                        continue
                    if isinstance(item.event, LLMCalled):
                        calls.append(item.event)
                    if domain.changes_projection(item.event):
                        fresh.setdefault(item.record.task_id, []).append(
                            (item.record.stream_seq, item.event)
                        )
                if calls:
                    await conn.execute(_INSERT_LLM_CALLS, *_call_columns(calls))
                if fresh:
                    await _project_batch(conn, fresh)
        except _OUTAGE as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return stored

    # --- semantic memory -------------------------------------------------------------

    async def prepare_embeddings(
        self, model: str, dimension: int, *, hnsw_m: int = 16, hnsw_ef_construction: int = 64
    ) -> None:
        """Bind the memories table to ``model``'s ``dimension`` (first start), or check it.

        The first replica types ``memories.embedding`` as ``vector(dimension)`` and builds
        the HNSW index (cosine); later starts only compare. Raises ``EmbeddingSpaceMismatch``
        if the database already holds embeddings of another model or dimension.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK)
            row = await conn.fetchrow("SELECT model, dimension FROM memory_space")
            if row is not None:
                if (row["model"], row["dimension"]) != (model, dimension):
                    raise EmbeddingSpaceMismatch(
                        f"the database holds {row['dimension']}-d embeddings of "
                        f"{row['model']!r}, but memory is configured with {model!r} "
                        f"({dimension}-d); configure that model again, or use another "
                        "database (re-embedding is not supported)"
                    )
                return
            # Inputs are an int and ints from settings, never text: safe to format.
            await conn.execute(
                f"ALTER TABLE memories ALTER COLUMN embedding TYPE vector({int(dimension)})"
            )
            await conn.execute(
                "CREATE INDEX memories_embedding_hnsw ON memories "
                "USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {int(hnsw_m)}, ef_construction = {int(hnsw_ef_construction)})"
            )
            await conn.execute(
                "INSERT INTO memory_space (model, dimension) VALUES ($1, $2)", model, dimension
            )
            log.info("memories bound to an embedding model", model=model, dimension=dimension)

    async def cached_embeddings(self, model: str, hashes: Sequence[bytes]) -> dict[bytes, Any]:
        """Cached embeddings of ``model`` by content hash (only those found)."""
        try:
            rows = await self._pool.fetch(_CACHED, model, list(hashes))
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return {bytes(r["sha256"]): r["embedding"].to_numpy() for r in rows}

    async def cache_embeddings(self, model: str, items: Sequence[tuple[bytes, Any]]) -> None:
        """Remember embeddings of ``model`` by content hash (first writer wins)."""
        if not items:
            return
        try:
            await self._pool.executemany(_CACHE, [(model, h, v) for h, v in items])
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def save_memory(self, memory: domain.NewMemory, embedding: Any) -> None:
        try:
            await self._pool.execute(
                _INSERT_MEMORY,
                memory.memory_id,
                memory.text,
                memory.kind,
                memory.metadata,
                memory.task_id,
                memory.source,
                embedding,
            )
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def search_memories(
        self, embedding: Any, query: domain.MemoryQuery, *, ef_search: int = 100
    ) -> list[domain.Found]:
        """The ``query.k`` memories nearest to ``embedding`` that pass the filters.

        The HNSW index answers with an iterative scan (pgvector 0.8, relaxed order), so
        a selective filter still yields k results when k exist; the outer query restores
        the exact order and applies the least score.
        """
        try:
            async with self._pool.acquire(timeout=10) as conn, conn.transaction():
                await conn.execute(
                    "SELECT set_config('hnsw.ef_search', $1, true), "
                    "set_config('hnsw.iterative_scan', 'relaxed_order', true)",
                    str(max(ef_search, query.k)),
                )
                rows = await conn.fetch(
                    _SEARCH,
                    embedding,
                    query.kind,
                    query.task_id,
                    query.metadata,
                    query.k,
                    query.min_score,
                )
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return [
            domain.Found(
                memory_id=r["memory_id"],
                text=r["text"],
                kind=r["kind"],
                score=float(r["score"]),
                task_id=r["task_id"],
                metadata=r["metadata"],
            )
            for r in rows
        ]

    # --- queries for people ------------------------------------------------------------

    async def list_tasks(
        self,
        *,
        status: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        tenant: str | None = None,
    ) -> list[TaskProjection]:
        """Tasks submitted in [since, until), newest first, optionally of one status and
        one tenant; each with its spend so far (see :func:`_with_spend`)."""
        try:
            async with (
                self._pool.acquire(timeout=10) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                rows = await conn.fetch(_LIST_TASKS, status, since, until, limit, tenant)
                return await _with_spend(conn, [TaskProjection.from_row(r) for r in rows])
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def costs(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        top_tasks: int,
        tenant: str | None = None,
    ) -> domain.CostReport:
        """LLM spend of the tasks submitted in [since, until), optionally of one tenant:
        totals, by model, by task.

        Per task: the sum of its rows in ``llm_calls`` when it has any (every call of the
        planner and the executors), else the usage in its projection (see ``_SPEND``).
        """
        try:
            async with (
                self._pool.acquire(timeout=10) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                count = await conn.fetchval(_COUNT_TASKS, since, until, tenant)
                by_model = await conn.fetch(_COSTS_BY_MODEL, since, until, tenant)
                top = await conn.fetch(_COSTLIEST_TASKS, since, until, tenant, top_tasks)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return domain.CostReport(
            tasks=int(count),
            by_model={r["model"]: dict(r) for r in by_model},
            costliest=[TaskCost.model_validate(dict(r)) for r in top],
        )

    # --- reads -----------------------------------------------------------------------

    async def task_history(
        self, task_id: str, *, tenant: str | None = None
    ) -> tuple[TaskProjection | None, list[StoredEvent]]:
        """A task's projection (None if none yet) with its spend so far, and its stored
        events in stream order. With ``tenant``, a task that is not that tenant's (or
        has no projection yet, so no known tenant) is (None, []): an unknown task."""
        try:
            async with (
                self._pool.acquire(timeout=10) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                projection = await _load_projection(conn, task_id)
                if tenant is not None and (projection is None or projection.tenant != tenant):
                    return None, []
                if projection is not None:
                    (projection,) = await _with_spend(conn, [projection])
                rows = await conn.fetch(_TASK_EVENTS, task_id)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return projection, [_stored_event(r) for r in rows]

    # --- API keys (only hashes: a key never reaches memory) ---------------------------

    async def create_key(self, *, key_id: str, tenant: str, key_hash: str, prefix: str) -> KeyInfo:
        """Store a key; ``DuplicateKey`` if its hash is stored already."""
        try:
            row = await self._pool.fetchrow(_INSERT_KEY, key_id, tenant, key_hash, prefix)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        if row is None:
            raise DuplicateKey("a key with this hash is stored already")
        return _key_info(row)

    async def list_keys(self, *, tenant: str | None) -> list[KeyInfo]:
        """Every key, revoked ones too, optionally of one tenant; oldest first."""
        try:
            rows = await self._pool.fetch(_LIST_KEYS, tenant)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return [_key_info(r) for r in rows]

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key now; False if it is unknown or revoked already."""
        try:
            found = await self._pool.fetchval(_REVOKE_KEY, key_id)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return found is not None

    async def verify_key(self, key_hash: str) -> KeyInfo | None:
        """The key with this hash, if there is one and it is not revoked."""
        try:
            row = await self._pool.fetchrow(_VERIFY_KEY, key_hash)
        except _DB_ERRORS as exc:
            raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return None if row is None else _key_info(row)


# --- queries -------------------------------------------------------------------------

_LOCK_TASKS = """
SELECT pg_advisory_xact_lock($1, h)
FROM (SELECT DISTINCT hashtext(t) AS h FROM unnest($2::text[]) AS t ORDER BY 1) AS ordered
"""

_INSERT_EVENTS = """
INSERT INTO events (event_id, task_id, type, subject, stream_seq, schema_version,
                    occurred_at, payload)
SELECT e, t, ty, su, sq, v, o, p::jsonb
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::int[],
            $7::timestamptz[], $8::text[]) AS x(e, t, ty, su, sq, v, o, p)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

_INSERT_LLM_CALLS = """
INSERT INTO llm_calls (event_id, task_id, step_id, role, conversation, model,
                       prompt_tokens, completion_tokens, cached_tokens, cost_usd,
                       reserved_tokens, reserved_cost_usd, duration_ms, occurred_at)
SELECT *
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::bigint[], $10::float8[],
            $11::bigint[], $12::float8[], $13::float8[], $14::timestamptz[])
ON CONFLICT (event_id) DO NOTHING
"""

_TASK_EVENTS = """
SELECT stream_seq, event_id, type, occurred_at, payload
FROM events
WHERE task_id = $1
ORDER BY stream_seq NULLS LAST, occurred_at
"""

# The stored events of a task that change its projection (LLM calls, often the most,
# do not), for a replay.
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
    "approvals",
    "paused_round",
    "tenant",
)

_SELECT_TASK = f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE task_id = $1"  # noqa: S608
_SELECT_TASKS = f"SELECT {', '.join(_TASK_COLUMNS)} FROM tasks WHERE task_id = ANY($1::text[])"  # noqa: S608

_UPSERT_TASK = f"""
INSERT INTO tasks ({", ".join(_TASK_COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(_TASK_COLUMNS) + 1))})
ON CONFLICT (task_id) DO UPDATE SET
{", ".join(f"{c} = EXCLUDED.{c}" for c in _TASK_COLUMNS[1:])}
"""  # noqa: S608 - built from the constant column list above, no input


_CACHED = """
SELECT sha256, embedding FROM embedding_cache WHERE model = $1 AND sha256 = ANY($2::bytea[])
"""

_CACHE = """
INSERT INTO embedding_cache (model, sha256, embedding) VALUES ($1, $2, $3)
ON CONFLICT (model, sha256) DO NOTHING
"""

_INSERT_MEMORY = """
INSERT INTO memories (memory_id, text, kind, metadata, task_id, source, embedding)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

# Filters go inside, next to the index scan (iterative scans keep scanning until k rows
# pass them); relaxed_order may return rows slightly out of order, so sort again outside.
_SEARCH = """
WITH nearest AS MATERIALIZED (
    SELECT memory_id, text, kind, task_id, metadata, embedding <=> $1 AS distance
    FROM memories
    WHERE ($2::text IS NULL OR kind = $2)
      AND ($3::text IS NULL OR task_id = $3)
      AND metadata @> $4::jsonb
    ORDER BY embedding <=> $1
    LIMIT $5
)
SELECT memory_id, text, kind, task_id, metadata, 1 - distance AS score
FROM nearest
WHERE 1 - distance >= $6
ORDER BY distance
"""

# The tasks a costs query covers: submitted in [$1, $2), of tenant $3 when it is given.
_IN_RANGE = (
    "($1::timestamptz IS NULL OR created_at >= $1) AND ($2::timestamptz IS NULL OR created_at < $2)"
    " AND ($3::text IS NULL OR tenant = $3)"
)

_LIST_TASKS = f"""
SELECT {", ".join(_TASK_COLUMNS)} FROM tasks
WHERE ($1::text IS NULL OR status = $1)
  AND ($2::timestamptz IS NULL OR created_at >= $2)
  AND ($3::timestamptz IS NULL OR created_at < $3)
  AND ($5::text IS NULL OR tenant = $5)
ORDER BY created_at DESC, task_id
LIMIT $4
"""  # noqa: S608 - built from the constant column list above, no input

_COUNT_TASKS = f"SELECT count(*) FROM tasks WHERE {_IN_RANGE}"  # noqa: S608

# Spend per task and model of the tasks submitted in range. A task's LLM calls are the
# complete record: every call of the planner and the executors, as soon as it is made.
# Its projection's usage counts a plan or a step attempt only once it is done (and
# nothing of a planning call that a budget pause interrupted); it stands in only for
# tasks with no recorded call, stored before memory kept them.
_CALL_SUMS = """
           sum(c.prompt_tokens)     AS prompt_tokens,
           sum(c.completion_tokens) AS completion_tokens,
           sum(c.cached_tokens)     AS cached_tokens,
           count(*)                 AS calls,
           sum(c.cost_usd)          AS cost_usd"""

_SPEND = f"""
in_range AS (SELECT task_id, usage FROM tasks WHERE {_IN_RANGE}),
spend AS (
    SELECT c.task_id, c.model, {_CALL_SUMS}
    FROM llm_calls AS c JOIN in_range AS t USING (task_id)
    GROUP BY c.task_id, c.model
    UNION ALL
    SELECT t.task_id, m.key,
           coalesce((m.value->>'prompt_tokens')::bigint, 0),
           coalesce((m.value->>'completion_tokens')::bigint, 0),
           coalesce((m.value->>'cached_tokens')::bigint, 0),
           coalesce((m.value->>'calls')::bigint, 0),
           coalesce((m.value->>'cost_usd')::float8, 0)
    FROM in_range AS t, jsonb_each(t.usage->'by_model') AS m
    WHERE NOT EXISTS (SELECT 1 FROM llm_calls AS c WHERE c.task_id = t.task_id)
)
"""  # noqa: S608 - constant fragments only

_COSTS_BY_MODEL = f"""
WITH {_SPEND}
SELECT model,
       sum(prompt_tokens)     AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens,
       sum(cached_tokens)     AS cached_tokens,
       sum(calls)             AS calls,
       sum(cost_usd)          AS cost_usd
FROM spend
GROUP BY model
ORDER BY model
"""  # noqa: S608 - constant fragments only

# Usage as contracts.Usage JSON ({"by_model": {model: ModelUsage}}); tasks that spent
# nothing are listed too, after the others.
_COSTLIEST_TASKS = f"""
WITH {_SPEND},
per_task AS (
    SELECT task_id,
           sum(cost_usd) AS cost_usd,
           jsonb_object_agg(model, jsonb_build_object(
               'prompt_tokens', prompt_tokens,
               'completion_tokens', completion_tokens,
               'cached_tokens', cached_tokens,
               'calls', calls,
               'cost_usd', cost_usd)) AS by_model
    FROM spend
    GROUP BY task_id
)
SELECT t.task_id, t.goal, t.status, t.created_at,
       jsonb_build_object('by_model', coalesce(p.by_model, '{{}}'::jsonb)) AS usage
FROM tasks AS t JOIN in_range USING (task_id) LEFT JOIN per_task AS p USING (task_id)
ORDER BY coalesce(p.cost_usd, 0) DESC, t.created_at DESC
LIMIT $4
"""  # noqa: S608 - constant fragments only


_SPENT_BY = f"""
SELECT c.task_id, c.model, {_CALL_SUMS}
FROM llm_calls AS c
WHERE c.task_id = ANY($1::text[])
GROUP BY c.task_id, c.model
"""  # noqa: S608 - constant fragments only


async def _with_spend(
    conn: asyncpg.Connection, projections: list[TaskProjection]
) -> list[TaskProjection]:
    """The tasks with their usage taken from their recorded LLM calls, where they have
    any: every call, counted as it is made, as ``agentbus costs`` counts it. (A
    projection's own usage counts a plan or step attempt only once it is done.)"""
    if not projections:
        return projections
    rows = await conn.fetch(_SPENT_BY, [p.task_id for p in projections])
    spent: dict[str, dict[str, ModelUsage]] = {}
    for r in rows:
        spent.setdefault(r["task_id"], {})[r["model"]] = ModelUsage.model_validate(dict(r))
    return [
        replace(p, usage=Usage(by_model=spent[p.task_id])) if p.task_id in spent else p
        for p in projections
    ]


_KEY_COLUMNS = "key_id, tenant, prefix, created_at, revoked_at"

# ON CONFLICT on the hash only: a duplicate hash is a refusal, not an error.
_INSERT_KEY = f"""
INSERT INTO api_keys (key_id, tenant, key_hash, prefix) VALUES ($1, $2, $3, $4)
ON CONFLICT (key_hash) DO NOTHING
RETURNING {_KEY_COLUMNS}
"""  # noqa: S608 - constant fragments only

_LIST_KEYS = f"""
SELECT {_KEY_COLUMNS} FROM api_keys
WHERE ($1::text IS NULL OR tenant = $1)
ORDER BY created_at, key_id
"""  # noqa: S608 - constant fragments only

_REVOKE_KEY = """
UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL
RETURNING key_id
"""

_VERIFY_KEY = f"""
SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL
"""  # noqa: S608 - constant fragments only


def _key_info(row: asyncpg.Record) -> KeyInfo:
    return KeyInfo(
        key_id=row["key_id"],
        tenant=row["tenant"],
        prefix=row["prefix"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def _call_columns(calls: Sequence[LLMCalled]) -> list[list[Any]]:
    """The ``llm_calls`` rows column by column, for ``unnest``."""
    return [
        [c.event_id for c in calls],
        [c.task_id for c in calls],
        [c.step_id for c in calls],
        [c.role for c in calls],
        [c.conversation for c in calls],
        [c.model for c in calls],
        [c.usage.prompt_tokens for c in calls],
        [c.usage.completion_tokens for c in calls],
        [c.usage.cached_tokens for c in calls],
        [c.usage.cost_usd for c in calls],
        [c.reserved_tokens for c in calls],
        [c.reserved_cost_usd for c in calls],
        [c.duration_ms for c in calls],
        [c.occurred_at for c in calls],
    ]


def _columns(records: Sequence[EventRecord]) -> list[list[Any]]:
    """The event rows column by column, for ``unnest``."""
    return [
        [r.event_id for r in records],
        [r.task_id for r in records],
        [r.type for r in records],
        [r.subject for r in records],
        [r.stream_seq for r in records],
        [r.schema_version for r in records],
        [r.occurred_at for r in records],
        [_dumps(r.payload) for r in records],
    ]


async def _project_batch(
    conn: asyncpg.Connection, fresh: dict[str, list[tuple[int, Event]]]
) -> None:
    """Fold newly stored events into their tasks: on top of each projection when they
    are newer than it, else by replaying the task's stored history (one came late)."""
    rows = await conn.fetch(_SELECT_TASKS, list(fresh))
    current = {r["task_id"]: TaskProjection.from_row(r) for r in rows}
    upserts: list[list[Any]] = []
    for task_id, history in fresh.items():
        history.sort(key=lambda pair: pair[0])
        before = current.get(task_id)
        if domain.in_order(before, history[0][0]):
            updated = before
            for seq, event in history:
                updated = domain.apply(updated, event, seq)
        else:
            log.debug("event arrived out of order; replaying the task", task_id=task_id)
            updated = domain.replay(await _known_history(conn, task_id))
        if updated is not None and updated != before:
            row = updated.to_row()
            upserts.append([row[c] for c in _TASK_COLUMNS])
    if upserts:
        await conn.executemany(_UPSERT_TASK, upserts)


async def _load_projection(conn: asyncpg.Connection, task_id: str) -> TaskProjection | None:
    row = await conn.fetchrow(_SELECT_TASK, task_id)
    return None if row is None else TaskProjection.from_row(row)


async def _known_history(conn: asyncpg.Connection, task_id: str) -> list[tuple[int, Event]]:
    rows = await conn.fetch(_KNOWN_TASK_EVENTS, task_id, sorted(domain.PROJECTED_TYPES))
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
