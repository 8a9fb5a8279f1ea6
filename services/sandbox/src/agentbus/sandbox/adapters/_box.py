"""A task's container as this replica knows it, and its waiting exec (the loader).

Starting a ``docker exec`` (runc) is most of a warm run's latency, so each task's
container (pool ones too) keeps one exec of ``domain.READY_ARGV`` started and
waiting on stdin; a run writes its command line to it and it execs exactly what a
fresh exec would have run, under the same wrapper. The next one is started after
the run, in the background (``Box.refill``, cancelled and awaited by
:func:`release` when the box is forgotten). It runs as the sandbox user, so code of
the same task can kill it (the liveness check then falls back to a fresh exec) but
gains nothing it does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiodocker
import aiohttp
import structlog

from .. import domain
from . import cgroup
from ._exec import start_exec

log = structlog.get_logger(__name__)


@dataclass
class Ready:
    """A started exec of ``domain.READY_ARGV`` waiting on stdin for its run."""

    execution: Any
    stream: Any


@dataclass
class Box:
    """A task's container as this replica knows it."""

    container: Any  # aiodocker.containers.DockerContainer
    oom_kills: int | None  # the cgroup's oom_kill counter when last looked at
    ready: Ready | None = None
    refill: asyncio.Task[None] | None = None  # starting the next ready exec
    cpu: cgroup.CpuCounter | None = None  # its CPU counter on the host, if visible
    cpu_located: bool = False  # looked for ``cpu`` already
    cpu_seen: int | None = None  # the last CPU counter value read, microseconds


def prefetch(box: Box) -> None:
    """Start the box's next waiting exec in the background (kept in ``box.refill``,
    cancelled and awaited by :func:`release`)."""
    if box.ready is None and (box.refill is None or box.refill.done()):
        box.refill = asyncio.create_task(make_ready(box), name="sandbox-ready")


async def make_ready(box: Box) -> None:
    try:
        execution = await start_exec(
            box.container, domain.READY_ARGV, env=domain.BASE_ENV, stdin=True
        )
        stream = execution.start(detach=False)
        await stream.__aenter__()
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        log.debug("could not start a ready exec", error=str(exc))
        return
    box.ready = Ready(execution, stream)


async def take_ready(box: Box) -> Ready | None:
    """The box's waiting exec if it is alive (waiting for one on its way, which is
    never slower than starting a new one). The next one is started after the run
    (``DockerSandbox._after_run``): starting an exec takes CPU from the container's
    quota, and the run would pay for it."""
    if box.ready is None and box.refill is not None and not box.refill.done():
        with contextlib.suppress(Exception):
            await asyncio.shield(box.refill)
    ready, box.ready = box.ready, None
    if ready is None:
        return None
    try:
        alive = bool((await ready.execution.inspect()).get("Running"))
    except aiodocker.DockerError:
        alive = False
    if not alive:
        await close_ready(ready)
        return None
    return ready


async def close_ready(ready: Ready) -> None:
    with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
        await ready.stream.close()


async def release(box: Box | None) -> None:
    """Stop a forgotten box's background work and its waiting exec."""
    if box is None:
        return
    if box.refill is not None:
        box.refill.cancel()
        await asyncio.gather(box.refill, return_exceptions=True)
    ready, box.ready = box.ready, None
    if ready is not None:
        await close_ready(ready)
