"""One command in a container through ``docker exec``: start it, feed its stdin,
collect its capped output and exit code under a deadline. Also the short probes
that read the container cgroup's counters this way, and engine errors turned into
:class:`SandboxError` / :class:`SandboxUnavailable`.

``deadline_s`` is only the safety net: every command carries its own
``timeout -s KILL`` inside the container (``domain.RUN_SCRIPT``, ``timeout_argv``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp

from .. import domain
from ..domain import SANDBOX_USER, WORKSPACE, OutputCap, SandboxError, SandboxUnavailable

STREAM_STDOUT = 1  # 2 is stderr
FEED_POLL_S = 0.2


@dataclass
class Run:
    exit_code: int | None
    stdout: OutputCap
    stderr: OutputCap
    duration_s: float
    safety_net_fired: bool
    cpu_seconds: float = 0.0  # measured only for code runs (``measure_cpu``)


@contextlib.contextmanager
def docker_errors(what: str) -> Iterator[None]:
    """Turn engine errors into SandboxError / SandboxUnavailable with a clear reason."""
    try:
        yield
    except SandboxError:
        raise
    except aiodocker.DockerError as exc:
        raise SandboxError(
            f"{what} failed: Docker engine said ({exc.status}) {exc.message}"
        ) from exc
    except (aiohttp.ClientConnectionError, OSError) as exc:
        raise SandboxUnavailable(f"{what} failed: cannot reach the Docker engine: {exc}") from exc
    except TimeoutError as exc:
        raise SandboxUnavailable(
            f"{what} failed: the Docker engine did not answer in time"
        ) from exc


def stdin_transport(stream: Any) -> Any:
    """The hijacked connection's transport, to half-close the exec's stdin.

    aiodocker's ``Stream.close()`` closes both directions, so to send EOF to the
    process while still reading its output we ``write_eof()`` on the transport
    ourselves (checked against aiodocker 0.27; fails loudly if that ever changes).
    """
    response = getattr(stream, "_resp", None)
    connection = getattr(response, "connection", None)
    transport = getattr(connection, "transport", None)
    if transport is None or not transport.can_write_eof():
        raise SandboxError("cannot send stdin to the sandbox with this aiodocker version")
    return transport


async def start_exec(
    container: Any,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdin: bool = False,
) -> Any:
    """Create (not yet start) an exec of argv as the sandbox user in /workspace."""
    return await container.exec(
        list(argv),
        user=SANDBOX_USER,
        environment=dict(env) if env is not None else None,
        workdir=WORKSPACE,
        stdin=stdin,
    )


async def collect(
    execution: Any,
    *,
    deadline_s: float,
    cap: int,
    stdin: bytes | None = None,
    started_stream: Any = None,
) -> Run:
    """Start the exec (unless ``started_stream`` is its started stream) and collect
    its capped output and exit code.

    ``deadline_s`` is the safety net around everything; the command itself carries
    its own ``timeout -s KILL``.
    """
    out, err = OutputCap(cap), OutputCap(cap)
    started = time.monotonic()
    fired = False

    async def feed(stream: Any, data: bytes) -> None:
        transport = stdin_transport(stream)
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await stream.write_in(data)
            transport.write_eof()

    async def drain(stream: Any) -> None:
        while (message := await stream.read_out()) is not None:
            (out if message.stream == STREAM_STDOUT else err).feed(message.data)

    async def watch(feeding: asyncio.Task[None], draining: asyncio.Task[None]) -> None:
        # Only commands that read stdin to EOF (cat) get stdin, but one may die before
        # reading it all (cannot fork, bad path). Docker's stdin copy then blocks, and
        # the output stream with it, forever: once the process is gone, stop both.
        while not feeding.done():
            await asyncio.wait({feeding}, timeout=FEED_POLL_S)  # not a fixed sleep
            if feeding.done() or (await execution.inspect()).get("Running"):
                continue
            await asyncio.wait({draining}, timeout=0.5)
            feeding.cancel()
            draining.cancel()

    try:
        opened = started_stream or execution.start(detach=False)
        async with asyncio.timeout(deadline_s), opened as stream:
            if stdin is None:
                await drain(stream)
            else:
                try:
                    async with asyncio.TaskGroup() as group:
                        feeding = group.create_task(feed(stream, stdin))
                        draining = group.create_task(drain(stream))
                        group.create_task(watch(feeding, draining))
                except ExceptionGroup as failed:
                    raise failed.exceptions[0] from None
    except TimeoutError:
        fired = True
    duration = time.monotonic() - started
    exit_code: int | None = None
    if not fired:
        # The stream can end a moment before the exec is reaped. If the container was
        # removed meanwhile (destroy), the exit code is unknown: None.
        with contextlib.suppress(aiodocker.DockerError):
            for _ in range(50):
                info = await execution.inspect()
                if not info.get("Running"):
                    exit_code = info.get("ExitCode")
                    break
                await asyncio.sleep(0.02)
    return Run(exit_code, out, err, duration, fired)


async def exec_running(docker: Any, container: Any) -> bool:
    """Whether any exec (maybe another replica's) is still running in it."""
    try:
        info = await container.show()
        for exec_id in info.get("ExecIDs") or []:
            details = await aiodocker.execs.Exec(docker, exec_id).inspect()
            command = details.get("ProcessConfig") or {}
            waiting = [command.get("entrypoint"), *command.get("arguments", [])]
            # A waiting exec is not use; a run that went through one touched the
            # activity marker when it started (idle_ttl_s > max_timeout_s).
            if details.get("Running") and waiting != domain.READY_ARGV:
                return True
    except aiodocker.DockerError:
        return False
    return False


# --- counters read inside the container ----------------------------------------------


async def is_running(container: Any) -> bool:
    """Whether the container still runs: False once it is stopped, gone, or being
    removed (the engine marks it ``removing`` before it kills what runs inside)."""
    try:
        info = await container.show()
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return False
        raise
    return str(info.get("State", {}).get("Status")) == "running"


async def _probe(
    container: Any, argv: list[str], parse: Callable[[bytes], int | None]
) -> int | None:
    """Run a small read-only command in the container and parse what it prints; None if
    it cannot be run or read."""
    try:
        execution = await start_exec(container, argv)
        run = await collect(execution, deadline_s=10, cap=4096)
        return parse(run.stdout.data)
    except (
        aiodocker.DockerError,
        aiohttp.ClientError,
        OSError,
        TimeoutError,
        SandboxError,
        ValueError,
    ):
        return None


async def oom_kills(container: Any) -> int | None:
    """The container cgroup's OOM-kill counter; None if it cannot be read."""
    return await _probe(container, domain.OOM_COUNTER_ARGV, domain.parse_oom_kills)


async def cpu_usage_inside(container: Any) -> int | None:
    """The container cgroup's CPU counter in microseconds; None if it cannot be read."""
    return await _probe(container, domain.CPU_USAGE_ARGV, domain.parse_cpu_usage)
