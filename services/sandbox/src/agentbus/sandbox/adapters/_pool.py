"""The warm pool: started containers waiting for their task.

Each replica keeps ``pool_size`` started containers named ``agentbus-pool-<hex>`` in
memory, each bind-mounting its own empty host directory ``<root>/.pool/<name>``. A
task's first call claims one by *renaming* the container to
``agentbus-sbx-<task_id>``: container names are unique engine-wide and a rename is
atomic, so the name is the lock that makes every replica agree on one container per
task and no container ever serves two tasks (labels cannot be changed after create,
so tasks are found by name, not label). The claimer then renames the pool directory
to ``<root>/<task_id>``: a bind mount follows the directory, not its path, so the
running container now writes straight into the task's workspace, which outlives the
container for the user. A task whose workspace exists already (an earlier container
of it was removed) never claims one: it gets a container on its own files. A
background task refills the pool; :meth:`WarmPool.close` removes the unclaimed
containers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from ..domain import SandboxConfig, SandboxError
from . import _box
from ._box import Box
from ._containers import (
    LABEL_POOL,
    NAME_PREFIX,
    POOL_DIR,
    POOL_PREFIX,
    container_config,
    prepare_workspace,
    start_or_remove,
)
from ._cpu import CpuMeter
from ._exec import docker_errors

log = structlog.get_logger(__name__)

STALE_POOL_DIR_S = 600  # an empty pool directory this old with no container is a leftover


@dataclass
class PoolEntry:
    container: Any
    name: str
    workspace: Path
    box: Box | None = None  # with its waiting exec, started while in the pool


async def discard(entry: PoolEntry) -> None:
    """Remove a pool container (this replica's or a dead one's) and its directory."""
    await _box.release(entry.box)
    with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
        await entry.container.delete(force=True)
    with contextlib.suppress(OSError):
        await asyncio.to_thread(entry.workspace.rmdir)


def remove_stale_dirs(root: str, keep: set[str]) -> None:
    """Remove empty pool directories whose container is gone (nothing ever ran in a
    pool container, so a non-empty one is left alone: rmdir refuses it). Recent ones
    stay: another replica may be creating that directory's container right now."""
    pool_root = Path(root) / POOL_DIR
    old = time.time() - STALE_POOL_DIR_S
    with contextlib.suppress(FileNotFoundError):
        for entry in pool_root.iterdir():
            with contextlib.suppress(OSError):
                if entry.name not in keep and entry.lstat().st_mtime < old:
                    entry.rmdir()


class WarmPool:
    """One replica's pool; :meth:`refill` runs as its background task."""

    def __init__(self, docker: Any, config: SandboxConfig, root: str, cpu: CpuMeter) -> None:
        self._docker = docker
        self._config = config
        self._root = root
        self._cpu = cpu
        self._entries: collections.deque[PoolEntry] = collections.deque()
        # Every pool name this replica holds: from before its container is created
        # until a claim's rename has finished (or it is discarded). A superset of the
        # entries, so a reaper that reads it *before* listing containers never takes
        # one being created or claimed for another replica's orphan.
        self._owned: set[str] = set()
        self._wanted = asyncio.Event()
        self._full = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> set[str]:
        """This replica's pool containers, including those being created or claimed
        (the reaper leaves them alone; read it before listing the engine's)."""
        return set(self._owned)

    async def _discard(self, entry: PoolEntry) -> None:
        await discard(entry)
        self._owned.discard(entry.name)

    async def wait_full(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self._full.wait()

    async def close(self) -> None:
        """Remove the unclaimed containers (after the refill task was cancelled)."""
        entries = list(self._entries)
        self._entries.clear()
        await asyncio.gather(*(self._discard(entry) for entry in entries))

    async def _create_entry(self) -> PoolEntry:
        name = f"{POOL_PREFIX}{uuid.uuid4().hex[:16]}"
        source = Path(self._root) / POOL_DIR / name
        self._owned.add(name)
        try:
            await asyncio.to_thread(prepare_workspace, source)
            with docker_errors("starting a pool sandbox"):
                container = await self._docker.containers.create(
                    container_config(self._config, self._root, {LABEL_POOL: "1"}, source),
                    name=name,
                )
                await start_or_remove(container)
        except BaseException:
            self._owned.discard(name)
            with contextlib.suppress(OSError):
                source.rmdir()
            raise
        box = Box(container, 0)
        entry = PoolEntry(container, name, source, box)
        try:
            await _box.make_ready(box)  # the first run after a claim skips the exec start, too
            await self._cpu.locate(box)  # and its CPU counter is found already
        except BaseException:
            await self._discard(entry)
            raise
        return entry

    async def refill(self) -> None:
        """Keep ``pool_size`` started containers ready; back off while the engine fails."""
        failures = 0
        size = self._config.pool_size
        while True:
            self._wanted.clear()
            if len(self._entries) < size:
                # Let the claimer's first exec go first: creating a container competes
                # with it for the engine (and, on small hosts, for the CPU).
                await asyncio.sleep(self._config.refill_delay_s)
            while len(self._entries) < size:
                try:
                    entry = await self._create_entry()
                except SandboxError as exc:
                    failures += 1
                    delay = min(30.0, 0.5 * 2**failures)
                    log.warning("pool refill failed", error=str(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                self._entries.append(entry)
            self._full.set()
            await self._wanted.wait()

    async def claim(self, task_id: str, target: Path) -> Box | None:
        """Give the task a pool container with its workspace moved to ``target``, or
        None (pool empty, or the task has a container already, or its workspace
        exists from an earlier container)."""
        if not self._entries or await asyncio.to_thread(target.exists):
            return None  # empty pool, or an earlier container's workspace: mount it (cold)
        while self._entries:  # no await between this check and the pop
            entry = self._entries.popleft()
            self._full.clear()
            self._wanted.set()
            try:
                await entry.container.rename(f"{NAME_PREFIX}{task_id}")
            except aiodocker.DockerError as exc:
                if exc.status == 409:  # the task already has a container: keep ours
                    self._entries.appendleft(entry)
                    return None
                await self._discard(entry)  # gone or broken: try the next
                continue
            except asyncio.CancelledError:
                # Renamed or not, it is no pool container of ours any more: under its
                # task's name the idle reaper takes it, under its pool name the orphan
                # rule does.
                self._owned.discard(entry.name)
                raise
            self._owned.discard(entry.name)  # the task's now, under its task name
            try:
                await asyncio.to_thread(entry.workspace.rename, target)
            except OSError:
                log.warning("could not move a pool workspace into place; starting cold")
                await discard(entry)
                return None
            log.info("sandbox taken from the pool", container=entry.container.id[:12])
            return entry.box or Box(entry.container, 0)
        return None
