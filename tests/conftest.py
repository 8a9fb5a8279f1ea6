"""Shared fixtures. Integration fixtures start real servers on free loopback ports:
nats-server with JetStream and Postgres + pgvector, once per test session. Each test
isolates itself with unique task ids (uuid), so tests never see each other's data."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbus.cli.stack import NatsServer, Postgres


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    # Short path: Postgres puts its unix socket here (108-byte limit).
    with tempfile.TemporaryDirectory(prefix="ab-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def nats_server(tmp_root: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_root / "nats", log_file=tmp_root / "nats.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def postgres(tmp_root: Path) -> Iterator[Postgres]:
    pg = Postgres(tmp_root / "pg").start()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def database_url(postgres: Postgres) -> str:
    return postgres.url
