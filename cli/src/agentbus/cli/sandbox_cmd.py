"""``agentbus sandbox exec``: run code in a throwaway sandbox, for debugging.

It drives the sandbox service's Docker adapter in-process, with the service's own
settings (``AGENTBUS_SANDBOX_*``, so the same defaults and limits) and the same
hardened container: there is no unsandboxed path. The container and its workspace
are removed afterwards. Exit code: the run's (0 ok), 3 when no sandbox can be
started (engine down, image missing), 2 for a bad request.

Wiring (in ``main.build_parser``): ``sandbox_cmd.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import TextIO, cast

import structlog

from agentbus.contracts import ExecOutcome, Language, SandboxExecReply

EXIT_BAD_REQUEST = 2
EXIT_NO_SANDBOX = 3


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``sandbox exec`` on the top-level ``subparsers``."""
    sandbox = subparsers.add_parser("sandbox", help="debug the sandbox: run code in it")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True)
    run = sandbox_sub.add_parser(
        "exec",
        help="run a file (or code on stdin) in a throwaway sandbox with the default limits",
    )
    run.add_argument(
        "file", nargs="?", default="-", help="the code to run; '-' or nothing: read stdin"
    )
    run.add_argument(
        "--lang", choices=[lang.value for lang in Language], default=Language.PYTHON.value
    )
    run.add_argument("--timeout", type=float, help="time limit in seconds (default: the service's)")
    run.add_argument(
        "--json", action="store_true", help="print the typed result as one JSON object"
    )
    run.set_defaults(handler=_exec)


class _Stderr:
    """``sys.stderr`` as it is at each write, not as it was when logging was set up."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def quiet_logging() -> None:
    """The adapter's logs on stderr, warnings and up by default (AGENTBUS_LOG_LEVEL), so
    stdout holds only the run's output or the JSON result."""
    level = logging.getLevelName((os.environ.get("AGENTBUS_LOG_LEVEL") or "WARNING").upper())
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            level if isinstance(level, int) else logging.WARNING
        ),
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Stderr())),
    )


def _read_code(file: str) -> str:
    if file == "-":
        return sys.stdin.read()
    return Path(file).read_text(encoding="utf-8")


def _exit_code(reply: SandboxExecReply) -> int:
    if reply.exit_code is not None:
        return reply.exit_code
    return 124 if reply.outcome is ExecOutcome.TIMEOUT else 1


async def run_throwaway(
    language: Language, code: str, timeout_s: float | None = None
) -> SandboxExecReply:
    """Run ``code`` once in a throwaway sandbox: the sandbox service's own settings
    (``AGENTBUS_SANDBOX_*``) and hardened container, no warm pool, no reaper; the
    container and its workspace are removed afterwards. Raises ImportError (no sandbox
    package), SandboxUnavailable (engine down, image missing) or SandboxError."""
    from agentbus.sandbox.adapters.docker import DockerSandbox
    from agentbus.sandbox.main import Settings

    settings = Settings()
    config = settings.model_copy(update={"pool_size": 0, "idle_ttl_s": 0}).sandbox_config()
    sandbox = await DockerSandbox.open(config, settings.docker_url)
    task_id = f"cli-{uuid.uuid4().hex[:16]}"
    try:
        return await sandbox.run_code(
            task_id, language=language, code=code, timeout_s=timeout_s, env={}, stdin=None
        )
    finally:
        try:
            await sandbox.discard(task_id)
        finally:
            await sandbox.close()


async def _exec(args: argparse.Namespace) -> int:
    quiet_logging()
    try:
        code = await asyncio.to_thread(_read_code, args.file)
    except OSError as exc:
        print(f"agentbus: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_BAD_REQUEST
    try:
        from agentbus.sandbox.domain import InvalidRequest, SandboxError, SandboxUnavailable
    except ImportError:
        print("agentbus: the sandbox package (agentbus-sandbox) is not installed", file=sys.stderr)
        return EXIT_NO_SANDBOX
    failed = EXIT_BAD_REQUEST
    try:
        reply = await run_throwaway(Language(args.lang), code, args.timeout)
    except SandboxUnavailable as exc:
        print(f"agentbus: no sandbox: {exc}", file=sys.stderr)
        return EXIT_NO_SANDBOX
    except SandboxError as exc:  # InvalidRequest: the request; others: the engine
        failed = EXIT_BAD_REQUEST if isinstance(exc, InvalidRequest) else EXIT_NO_SANDBOX
        reply = SandboxExecReply(ok=False, error=str(exc))
    if args.json:
        print(reply.model_dump_json(indent=2))
    else:
        sys.stdout.write(reply.stdout)
        sys.stderr.write(reply.stderr)
        sys.stdout.flush()
        if reply.ok:
            print(
                f"[exit code {reply.exit_code}, {reply.outcome.value}, {reply.duration_ms:.0f} ms]",
                file=sys.stderr,
            )
    if not reply.ok:
        if not args.json:
            print(f"agentbus: {reply.error}", file=sys.stderr)
        return failed
    return _exit_code(reply)
