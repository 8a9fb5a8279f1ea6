"""Memory service entry point: ``python -m agentbus.memory`` or ``agentbus-memory``."""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import structlog
from faststream import FastStream
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import Histogram
from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from agentbus.contracts import subjects
from agentbus.core.bus import DeadLetterPolicy
from agentbus.core.service import Service, for_docs, run
from agentbus.core.settings import CommonSettings

from . import routes
from .adapters.db import Database
from .adapters.deliveries import JetStreamDeadLetters
from .adapters.dsn import describe_dsn
from .adapters.embeddings import Embedder, LocalEmbedder, OpenAIEmbedder
from .adapters.vector_check import VectorExtensionBroken
from .semantic import SemanticMemory
from .usecases import EventRecorder, KeyQueries, MemoryUseCases, SemanticQueries, TaskQueries

log = structlog.get_logger(__name__)

DATABASE_URL_VARS = ("AGENTBUS_DATABASE_URL", "DATABASE_URL")


class MissingDatabaseUrl(RuntimeError):
    """No database URL is configured; the message says which variable to set."""


class Settings(CommonSettings):
    """Memory's settings: env prefix ``AGENTBUS_MEMORY_``; the database URL has none."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_MEMORY_", extra="ignore")

    database_url: SecretStr = Field(
        SecretStr(""),
        validation_alias=AliasChoices(*DATABASE_URL_VARS),
        description="Postgres with pgvector, e.g. postgresql://user:pass@host:5432/agentbus. "
        "No default: it usually holds a password.",
    )
    database_log_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("AGENTBUS_DATABASE_LOG_FILE"),
        description="The Postgres server's log, when this replica can read it (the "
        "embedded stack sets it): a failed vector self-check then quotes its crash line.",
    )
    pool_min_size: int = Field(1, ge=0, description="Connections the pool keeps open.")
    pool_max_size: int = Field(10, ge=1, description="Most connections the pool opens.")
    connect_retries: int = Field(
        10, ge=0, description="Retries at start-up while Postgres is not reachable yet."
    )
    connect_backoff_s: float = Field(
        0.5, gt=0, description="First wait between start-up retries; doubles, capped at 10s."
    )
    event_batch_size: int = Field(
        100, ge=1, le=1000, description="Most events one replica stores in one transaction."
    )
    event_batch_wait_s: float = Field(
        0.05,
        gt=0,
        description="Longest wait to fill an event batch: the added latency of an event, "
        "and (idle) how often the consumer polls.",
    )
    events_durable: str = Field(
        subjects.MEMORY_EVENTS_DURABLE,
        description="Durable consumer name on the events stream, shared by all replicas.",
    )
    outage_backoff_s: float = Field(
        0.5, gt=0, description="First wait before retrying a batch while Postgres is away."
    )
    outage_backoff_max_s: float = Field(
        10, gt=0, description="Longest wait between retries while Postgres is away."
    )
    embedding_provider: Literal["local", "openai"] = Field(
        "local",
        description="local: all-MiniLM-L6-v2 on the CPU; openai: an OpenAI-compatible "
        "/v1/embeddings endpoint (embedding_url, embedding_model).",
    )
    embedding_url: str = Field(
        "", description="Base URL of the embeddings endpoint, e.g. http://host:8000/v1."
    )
    embedding_api_key: SecretStr = Field(SecretStr(""), description="Bearer token, if needed.")
    embedding_model: str = Field("", description="Model name sent to the embeddings endpoint.")
    embedding_batch_size: int = Field(64, ge=1, description="Texts per model call.")
    embedding_timeout_s: float = Field(30, gt=0, description="Embeddings endpoint timeout.")
    max_text_chars: int = Field(
        20_000, ge=1, description="Longest text save or search accepts (never truncated)."
    )
    search_ef: int = Field(100, ge=1, le=1000, description="HNSW ef_search (recall vs speed).")
    hnsw_m: int = Field(16, ge=2, le=100, description="HNSW m, when the index is built.")
    hnsw_ef_construction: int = Field(
        64, ge=4, le=1000, description="HNSW ef_construction, when the index is built."
    )

    @model_validator(mode="after")
    def _pool_sizes(self) -> Self:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) exceeds pool_max_size ({self.pool_max_size})"
            )
        return self

    def embedder(self) -> Embedder:
        """The configured embedding model (not loaded yet)."""
        if self.embedding_provider == "openai":
            if not self.embedding_url or not self.embedding_model:
                raise ValueError(
                    "embedding_provider=openai needs AGENTBUS_MEMORY_EMBEDDING_URL and "
                    "AGENTBUS_MEMORY_EMBEDDING_MODEL"
                )
            return OpenAIEmbedder(
                base_url=self.embedding_url,
                model=self.embedding_model,
                api_key=self.embedding_api_key.get_secret_value(),
                timeout_s=self.embedding_timeout_s,
                batch_size=self.embedding_batch_size,
                max_chars=self.max_text_chars,
            )
        return LocalEmbedder(batch_size=self.embedding_batch_size)

    def require_database_url(self) -> str:
        url = self.database_url.get_secret_value().strip()
        if not url:
            raise MissingDatabaseUrl(
                "memory needs a Postgres with pgvector: set AGENTBUS_DATABASE_URL "
                "(or DATABASE_URL), e.g. postgresql://user:pass@host:5432/agentbus"
            )
        return url


@dataclass(eq=False)
class _Running:
    """What the start-up hook opened: readiness asks it, shutdown stops and closes it."""

    uses: MemoryUseCases | None = None
    closing: AsyncExitStack = field(default_factory=AsyncExitStack)


def create_app(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastStream:
    """The memory app; the database and the embedding model are opened when it starts.

    ``embedder`` replaces the configured model (tests pass one to count its calls).
    """
    service = Service.create("memory", settings, tracer_provider=tracer_provider)
    service.serve(routes.build_router(settings))
    search_seconds = Histogram(
        "agentbus_memory_search_seconds",
        "Semantic memory search latency (embedding the query included).",
        ("outcome",),
        registry=service.metrics,
        buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    )
    running = _Running()

    async def database_answers() -> bool:
        """Readiness: the database answers ``SELECT 1`` (not open yet: not ready)."""
        return running.uses is not None and await running.uses.tasks.ready()

    service.readiness.append(database_answers)

    async def open_database() -> None:
        # A span per SQL statement, below the handler's span (OpenTelemetry's own
        # asyncpg instrumentation; it patches asyncpg once per process).
        instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(tracer_provider=service.tracer_provider)
        dsn = settings.require_database_url()
        try:
            db = await Database.open(
                dsn,
                min_size=settings.pool_min_size,
                max_size=settings.pool_max_size,
                connect_retries=settings.connect_retries,
                backoff_s=settings.connect_backoff_s,
                server_log=settings.database_log_file,
            )
        except VectorExtensionBroken as exc:
            # Not retried: it fails the same way each time. Events wait for a fixed replica.
            log.error(  # noqa: TRY400 - the reason is the message; a traceback adds nothing
                "the vector extension failed its self-check; memory serves nothing", reason=str(exc)
            )
            service.fail(str(exc))
            return
        running.closing.push_async_callback(db.close)
        log.info("database open", database=describe_dsn(dsn))
        # Loaded before subscribers start: a model that does not match the stored
        # embeddings stops the service here, with the reason, not at the first search.
        semantic = SemanticMemory(
            db,
            embedder or settings.embedder(),
            max_chars=settings.max_text_chars,
            ef_search=settings.search_ef,
        )
        running.closing.push_async_callback(semantic.embedder.close)
        await semantic.start(
            hnsw_m=settings.hnsw_m, hnsw_ef_construction=settings.hnsw_ef_construction
        )
        dead_letters = DeadLetterPolicy("memory", settings.bus)
        dead_letters.attach(service.broker)
        uses = MemoryUseCases(
            recorder=EventRecorder(
                events=db,
                dead_letters=JetStreamDeadLetters(dead_letters),
                max_deliver=settings.bus.max_deliver,
                ack_wait_s=settings.bus.ack_wait_s,
                outage_backoff_s=settings.outage_backoff_s,
                outage_backoff_max_s=settings.outage_backoff_max_s,
            ),
            tasks=TaskQueries(db),
            semantic=SemanticQueries(
                index=semantic,
                tracer=trace.get_tracer("agentbus.memory", tracer_provider=service.tracer_provider),
                search_seconds=search_seconds,
            ),
            keys=KeyQueries(db),
        )
        service.provide(routes.RECORDER, uses.recorder)
        service.provide(routes.TASKS, uses.tasks)
        service.provide(routes.SEMANTIC, uses.semantic)
        service.provide(routes.KEYS, uses.keys)
        running.uses = uses

    async def stop_waiting() -> None:
        if running.uses is not None:
            running.uses.recorder.stop()

    async def close_database() -> None:
        # The model first, then the database (the reverse of opening).
        running.uses = None
        await running.closing.aclose()

    return service.app(
        on_startup=[open_database], on_shutdown=[stop_waiting], after_shutdown=[close_database]
    )


def main() -> None:
    settings = Settings()
    try:
        settings.require_database_url()
    except MissingDatabaseUrl as exc:
        raise SystemExit(f"agentbus-memory: {exc}") from None
    run("memory", settings, create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return for_docs(create_app(Settings()))
