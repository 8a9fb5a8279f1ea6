"""Memory service entry point: ``python -m agentbus.memory`` or ``agentbus-memory``."""

from __future__ import annotations

from typing import Self

import structlog
from faststream import FastStream
from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from agentbus.core.service import Service, run
from agentbus.core.settings import CommonSettings

from .adapters.db import Database, describe_dsn
from .handlers import MemoryDeps, register

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
    pool_min_size: int = Field(1, ge=0, description="Connections the pool keeps open.")
    pool_max_size: int = Field(10, ge=1, description="Most connections the pool opens.")
    connect_retries: int = Field(
        10, ge=0, description="Retries at start-up while Postgres is not reachable yet."
    )
    connect_backoff_s: float = Field(
        0.5, gt=0, description="First wait between start-up retries; doubles, capped at 10s."
    )
    event_workers: int = Field(
        4, ge=1, description="Events one replica stores concurrently (its pull batch size)."
    )

    @model_validator(mode="after")
    def _pool_sizes(self) -> Self:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError(
                f"pool_min_size ({self.pool_min_size}) exceeds pool_max_size ({self.pool_max_size})"
            )
        return self

    def require_database_url(self) -> str:
        url = self.database_url.get_secret_value().strip()
        if not url:
            raise MissingDatabaseUrl(
                "memory needs a Postgres with pgvector: set AGENTBUS_DATABASE_URL "
                "(or DATABASE_URL), e.g. postgresql://user:pass@host:5432/agentbus"
            )
        return url


def create_app(settings: Settings) -> FastStream:
    """The memory app; the database is opened when the app starts, not here."""
    service = Service.create("memory", settings)
    deps = MemoryDeps(bus=settings.bus, event_workers=settings.event_workers)
    register(service.broker, deps)
    service.readiness.append(deps.ready)

    async def open_database() -> None:
        dsn = settings.require_database_url()
        deps.db = await Database.open(
            dsn,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            connect_retries=settings.connect_retries,
            backoff_s=settings.connect_backoff_s,
        )
        log.info("database open", database=describe_dsn(dsn))

    async def close_database() -> None:
        db, deps.db = deps.db, None
        if db is not None:
            await db.close()

    return service.app(on_startup=[open_database], after_shutdown=[close_database])


def main() -> None:
    settings = Settings()
    try:
        settings.require_database_url()
    except MissingDatabaseUrl as exc:
        raise SystemExit(f"agentbus-memory: {exc}") from None
    run("memory", settings, create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
