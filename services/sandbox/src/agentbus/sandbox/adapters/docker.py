"""The Docker engine: the only module that imports aiodocker.

One container per task, found by the label ``agentbus.task_id=<id>`` so every
replica on the same engine finds the same container; created on first use, reused
by every step, removed when the task ends. Agent code and every file operation run
inside it through ``docker exec`` as uid 65534; nothing agent-controlled is ever
opened on the host side (see :mod:`agentbus.sandbox.domain`).

Container hardening (each line is a wall the code inside has to get through):

* ``NetworkMode: none``: a loopback interface only, no route anywhere;
* ``User 65534:65534``, ``CapDrop: ALL``, ``no-new-privileges``: no root, no
  capabilities, no setuid escalation;
* ``ReadonlyRootfs`` with a small ``nosuid,nodev`` tmpfs on /tmp: only /workspace
  (the task's own bind mount) and /tmp are writable;
* ``Memory`` = ``MemorySwap`` (no swap), ``NanoCpus``, ``PidsLimit``, a ``nofile``
  ulimit: a fork bomb or a memory hog hurts only its own container;
* ``Init``: docker-init is PID 1 and reaps what killed runs leave behind;
* every run sits under ``timeout -s KILL`` inside the container, in a wrapper that
  kills whatever the run left running (``domain.RUN_SCRIPT``), plus an outer
  asyncio deadline here; if that safety net ever fires, the container is removed
  (it is recreated on the next call; the workspace files stay on the host);
* ``fsize`` ulimit = the workspace cap (no single file can pass it), and a guard
  that polls the workspace's disk usage while code runs and stops a run that grows
  it past ``workspace_max_mb`` (the container is replaced; files are kept).

Warm pool: each replica keeps ``pool_size`` started containers named
``agentbus-pool-<hex>`` in memory, each bind-mounting its own empty host directory
``<root>/.pool/<name>``. A task's first call claims one by *renaming* the container
to ``agentbus-sbx-<task_id>``: container names are unique engine-wide and a rename is
atomic, so the name is the lock that makes every replica agree on one container per
task and no container ever serves two tasks (labels cannot be changed after create,
so tasks are found by name, not label). The claimer then renames the pool directory
to ``<root>/<task_id>``: a bind mount follows the directory, not its path, so the
running container now writes straight into the task's workspace, which outlives the
container for the user. A background task refills the pool; ``close`` cancels it and
removes the unclaimed containers.

Waiting exec: starting a ``docker exec`` (runc) is most of a warm run's latency, so
each task's container (pool ones too) keeps one exec of ``domain.READY_ARGV`` started
and waiting on stdin; a run writes its command line to it and it execs exactly what a
fresh exec would have run, under the same wrapper. The next one is started after the
run, in the background (``_Box.refill``, cancelled and awaited when the box is
forgotten). It runs as the sandbox user, so code of the same task can kill it (the
liveness check then falls back to a fresh exec) but gains nothing it does not have.

Idle reaper: every op touches ``<root>/.activity/<task_id>``; a background task
removes task containers (of any replica on this root) unused for ``idle_ttl_s`` that
have no exec running. The workspace stays; the next call gets a fresh container.
It also removes other replicas' pool containers left unclaimed for a whole TTL (a
replica that died without cleaning up).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
import uuid
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from agentbus.contracts import (
    ExecOutcome,
    FileInfo,
    Language,
    SandboxExecReply,
    SandboxListFilesReply,
    SandboxReadFileReply,
    SandboxWriteFileReply,
    subjects,
)

from .. import domain
from ..domain import (
    EXIT_KILLED,
    SANDBOX_GID,
    SANDBOX_UID,
    SANDBOX_USER,
    WORKSPACE,
    OutputCap,
    SandboxConfig,
    SandboxError,
    SandboxUnavailable,
)
from . import workspace

log = structlog.get_logger(__name__)

LABEL_ROLE = "agentbus.role"
ROLE = "sandbox"
LABEL_TASK = "agentbus.task_id"
LABEL_ROOT = "agentbus.workspace_root"
LABEL_POOL = "agentbus.pool"
NAME_PREFIX = "agentbus-sbx-"
POOL_PREFIX = "agentbus-pool-"
POOL_DIR = ".pool"  # task ids cannot start with "." (subjects.check_token)
ACTIVITY_DIR = ".activity"

_STREAM_STDOUT = 1  # 2 is stderr
_CREATE_ATTEMPTS = 4
_FEED_POLL_S = 0.2
_REPLY_JSON_BUDGET = 768 * 1024  # leaves room under NATS's default 1 MB max_payload
_STALE_POOL_DIR_S = 600  # an empty pool directory this old with no container is a leftover


@dataclass
class _Ready:
    """A started exec of ``domain.READY_ARGV`` waiting on stdin for its run."""

    execution: Any
    stream: Any


@dataclass
class _Box:
    """A task's container as this replica knows it."""

    container: Any  # aiodocker.containers.DockerContainer
    oom_kills: int | None  # the cgroup's oom_kill counter when last looked at
    ready: _Ready | None = None
    refill: asyncio.Task[None] | None = None  # starting the next ready exec


@dataclass
class _PoolEntry:
    container: Any
    name: str
    workspace: Path
    box: _Box | None = None  # with its waiting exec, started while in the pool


@dataclass
class _Run:
    exit_code: int | None
    stdout: OutputCap
    stderr: OutputCap
    duration_s: float
    safety_net_fired: bool


@contextlib.contextmanager
def _docker_errors(what: str) -> Iterator[None]:
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


def _stdin_transport(stream: Any) -> Any:
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


class DockerSandbox:
    """Sandbox containers on one Docker engine; build with :meth:`open`."""

    def __init__(self, docker: Any, config: SandboxConfig) -> None:
        self._docker = docker
        self.config = config
        self._root = str(config.workspace_root.resolve())
        self._boxes: dict[str, _Box] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: collections.Counter[str] = collections.Counter()
        self._pool: collections.deque[_PoolEntry] = collections.deque()
        self._pool_wanted = asyncio.Event()
        self._pool_full = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []

    # --- life cycle ------------------------------------------------------------------

    @classmethod
    async def open(cls, config: SandboxConfig, docker_url: str | None = None) -> DockerSandbox:
        """Connect and check the engine answers and the image exists.

        Raises SandboxUnavailable with what to do: there is no unsandboxed fallback.
        """
        hint = "run `make setup` (or `make sandbox-image` once Docker is running)"
        try:
            docker = aiodocker.Docker(
                url=docker_url, timeout=aiohttp.ClientTimeout(total=120, connect=10)
            )
        except (AssertionError, ValueError, OSError) as exc:  # no socket found, bad URL
            raise SandboxUnavailable(f"no Docker engine found ({exc!r}); {hint}") from exc
        sandbox = cls(docker, config)
        where = docker_url or os.environ.get("DOCKER_HOST") or "the local Docker socket"
        try:
            try:
                async with asyncio.timeout(15):
                    await docker.version()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise SandboxUnavailable(
                    f"the Docker engine ({where}) does not answer ({exc}); {hint}"
                ) from exc
            try:
                await docker.images.inspect(config.image)
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise SandboxUnavailable(f"cannot inspect image {config.image}: {exc}") from exc
                raise SandboxUnavailable(
                    f"the sandbox image {config.image} is not on the Docker engine ({where}); "
                    "build it with `make sandbox-image` (part of "
                    "`make setup`). agentbus never runs agent code outside a container."
                ) from exc
        except BaseException:
            await docker.close()
            raise
        return sandbox

    def start(self) -> None:
        """Start the pool refill and the idle reaper (after :meth:`reap`, which would
        remove the pool). :meth:`close` cancels and awaits both."""
        if self._background:
            return
        if self.config.pool_size > 0:
            self._background.append(asyncio.create_task(self._refill(), name="sandbox-pool"))
        if self.config.idle_ttl_s > 0:
            self._background.append(asyncio.create_task(self._reap_idle(), name="sandbox-reaper"))

    async def close(self) -> None:
        """Stop the background tasks, remove the unclaimed pool containers, disconnect."""
        for task_id in list(self._boxes):
            await self._forget(task_id)
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pool = list(self._pool)
        self._pool.clear()
        await asyncio.gather(*(self._discard_pool_entry(entry) for entry in pool))
        await self._docker.close()

    @property
    def pool_available(self) -> int:
        """Started containers waiting in this replica's pool."""
        return len(self._pool)

    async def wait_pool_full(self, timeout: float = 30) -> None:
        """Wait until the pool holds ``pool_size`` containers (tests, benchmarks)."""
        async with asyncio.timeout(timeout):
            await self._pool_full.wait()

    async def ping(self) -> bool:
        """Readiness: the engine answers within 5 s."""
        try:
            async with asyncio.timeout(5):
                await self._docker.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return False
        return True

    async def reap(self, *, include_running: bool) -> int:
        """Remove sandbox containers of this workspace root left by earlier runs.

        With ``include_running`` False only stopped ones go: running ones may belong to
        another live replica sharing this engine. Returns how many were removed.
        """
        filters = {"label": [f"{LABEL_ROLE}={ROLE}", f"{LABEL_ROOT}={self._root}"]}
        removed = 0
        with _docker_errors("listing leftover sandboxes"):
            containers = await self._docker.containers.list(all=True, filters=filters)
        for container in containers:
            if not include_running and container["State"] == "running":
                continue
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
                removed += 1
        with _docker_errors("listing pool containers"):
            alive = {
                name.lstrip("/")
                for c in await self._docker.containers.list(all=True, filters=filters)
                for name in c["Names"]
            }
        await asyncio.to_thread(self._remove_pool_dirs, alive)
        return removed

    def _remove_pool_dirs(self, keep: set[str]) -> None:
        """Remove empty pool directories whose container is gone (nothing ever ran in a
        pool container, so a non-empty one is left alone: rmdir refuses it). Recent ones
        stay: another replica may be creating that directory's container right now."""
        pool_root = Path(self._root) / POOL_DIR
        old = time.time() - _STALE_POOL_DIR_S
        with contextlib.suppress(FileNotFoundError):
            for entry in pool_root.iterdir():
                with contextlib.suppress(OSError):
                    if entry.name not in keep and entry.lstat().st_mtime < old:
                        entry.rmdir()

    # --- containers ------------------------------------------------------------------

    def _container_config(self, labels: Mapping[str, str], source: Path) -> dict[str, Any]:
        """The hardened container, bind-mounting ``source`` at /workspace."""
        cfg = self.config
        memory = cfg.memory_mb * 1024 * 1024
        fsize = cfg.workspace_max_bytes
        return {
            "Image": cfg.image,
            "Cmd": ["sleep", "infinity"],
            "User": SANDBOX_USER,
            "WorkingDir": WORKSPACE,
            "Env": [f"{k}={v}" for k, v in domain.BASE_ENV.items()],
            "Labels": {LABEL_ROLE: ROLE, LABEL_ROOT: self._root, **labels},
            "NetworkDisabled": True,
            "HostConfig": {
                # docker-init (tini) as PID 1 reaps the orphans a kill at the time limit
                # leaves; under a bare `sleep` they stay zombies and eat the pids limit.
                "Init": True,
                "NetworkMode": "none",
                "Memory": memory,
                "MemorySwap": memory,  # equal to Memory: no swap
                "NanoCpus": int(cfg.cpus * 1e9),
                "PidsLimit": cfg.pids_limit,
                "ReadonlyRootfs": True,
                "Tmpfs": {domain.SANDBOX_TMP: f"rw,nosuid,nodev,size={cfg.tmp_size_mb}m"},
                "SecurityOpt": ["no-new-privileges:true"],
                "CapDrop": ["ALL"],
                "Ulimits": [
                    {"Name": "nofile", "Soft": cfg.nofile, "Hard": cfg.nofile},
                    # no single file (workspace or /tmp) may pass the workspace cap
                    {"Name": "fsize", "Soft": fsize, "Hard": fsize},
                ],
                "Mounts": [
                    {
                        "Type": "bind",
                        "Source": str(source),
                        "Target": WORKSPACE,
                        "ReadOnly": False,
                    }
                ],
                "RestartPolicy": {"Name": "no"},
            },
        }

    def _workspace_dir(self, task_id: str) -> Path:
        return Path(self._root) / subjects.check_token(task_id)

    def _activity_marker(self, task_id: str) -> Path:
        return Path(self._root) / ACTIVITY_DIR / task_id

    def _prepare_workspace(self, path: Path) -> None:
        """Create a host workspace directory, owned by the sandbox user.

        Only the directory itself is touched here (it was just created or already
        belongs to this task); its contents are never opened from the host.
        """
        path.mkdir(parents=True, exist_ok=True)
        try:
            os.chown(path, SANDBOX_UID, SANDBOX_GID)
        except PermissionError:
            path.chmod(0o777)
            log.warning(
                "cannot chown the workspace to the sandbox user (not root?); made it "
                "world-writable instead",
                path=str(path),
            )

    async def _find(self, task_id: str) -> list[Any]:
        """The task's container, by its engine-wide unique name (pool containers carry
        no task label: they get their task by rename)."""
        name = f"^/{NAME_PREFIX}{subjects.check_token(task_id)}$"
        filters = {"label": [f"{LABEL_ROLE}={ROLE}"], "name": [name]}
        containers: list[Any] = await self._docker.containers.list(all=True, filters=filters)
        return containers

    async def _oom_kills(self, container: Any) -> int | None:
        """The container cgroup's OOM-kill counter; None if it cannot be read."""
        try:
            execution = await self._start_exec(container, domain.OOM_COUNTER_ARGV)
            run = await self._collect(execution, deadline_s=10, cap=4096)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, SandboxError):
            return None
        return domain.parse_oom_kills(run.stdout.data)

    # --- warm pool ---------------------------------------------------------------------

    async def _create_pool_entry(self) -> _PoolEntry:
        name = f"{POOL_PREFIX}{uuid.uuid4().hex[:16]}"
        source = Path(self._root) / POOL_DIR / name
        await asyncio.to_thread(self._prepare_workspace, source)
        try:
            with _docker_errors("starting a pool sandbox"):
                container = await self._docker.containers.create(
                    self._container_config({LABEL_POOL: "1"}, source), name=name
                )
                try:
                    await container.start()
                except aiodocker.DockerError:
                    with contextlib.suppress(aiodocker.DockerError):
                        await container.delete(force=True)
                    raise
        except BaseException:
            with contextlib.suppress(OSError):
                source.rmdir()
            raise
        box = _Box(container, 0)
        await self._make_ready(box)  # the first run after a claim skips the exec start, too
        return _PoolEntry(container, name, source, box)

    async def _discard_pool_entry(self, entry: _PoolEntry) -> None:
        await self._release(entry.box)
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await entry.container.delete(force=True)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(entry.workspace.rmdir)

    async def _refill(self) -> None:
        """Keep ``pool_size`` started containers ready; back off while the engine fails."""
        failures = 0
        while True:
            self._pool_wanted.clear()
            if len(self._pool) < self.config.pool_size and self._background:
                # Let the claimer's first exec go first: creating a container competes
                # with it for the engine (and, on small hosts, for the CPU).
                await asyncio.sleep(self.config.refill_delay_s)
            while len(self._pool) < self.config.pool_size:
                try:
                    entry = await self._create_pool_entry()
                except SandboxError as exc:
                    failures += 1
                    delay = min(30.0, 0.5 * 2**failures)
                    log.warning("pool refill failed", error=str(exc), retry_in_s=delay)
                    await asyncio.sleep(delay)
                    continue
                failures = 0
                self._pool.append(entry)
            self._pool_full.set()
            await self._pool_wanted.wait()

    async def _claim(self, task_id: str) -> _Box | None:
        """Give the task a pool container, or None (pool empty, or the task has a
        container already, or its workspace exists from an earlier container)."""
        target = self._workspace_dir(task_id)
        if not self._pool or await asyncio.to_thread(target.exists):
            return None  # empty pool, or an earlier container's workspace: mount it (cold)
        while self._pool:  # no await between this check and the pop
            entry = self._pool.popleft()
            self._pool_full.clear()
            self._pool_wanted.set()
            try:
                await entry.container.rename(f"{NAME_PREFIX}{task_id}")
            except aiodocker.DockerError as exc:
                if exc.status == 409:  # the task already has a container: keep ours
                    self._pool.appendleft(entry)
                    return None
                await self._discard_pool_entry(entry)  # gone or broken: try the next
                continue
            try:
                await asyncio.to_thread(entry.workspace.rename, target)
            except OSError:
                log.warning("could not move a pool workspace into place; starting cold")
                await self._discard_pool_entry(entry)
                return None
            log.info("sandbox taken from the pool", container=entry.container.id[:12])
            return entry.box or _Box(entry.container, 0)
        return None

    async def _find_or_create(self, task_id: str) -> _Box:
        claimed = await self._claim(task_id)
        if claimed is not None:
            return claimed
        for attempt in range(_CREATE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.2 * attempt)
            for found in await self._find(task_id):
                state = found["State"]
                if state == "running":
                    return _Box(found, await self._oom_kills(found))
                if state in {"created", "exited"}:
                    try:
                        await found.start()
                    except aiodocker.DockerError:
                        log.warning("restarting a stopped sandbox failed; recreating it")
                    else:
                        return _Box(found, await self._oom_kills(found))
                with contextlib.suppress(aiodocker.DockerError):
                    await found.delete(force=True)
            source = self._workspace_dir(task_id)
            await asyncio.to_thread(self._prepare_workspace, source)
            started = time.monotonic()
            try:
                container = await self._docker.containers.create(
                    self._container_config({LABEL_TASK: task_id}, source),
                    name=f"{NAME_PREFIX}{task_id}",
                )
            except aiodocker.DockerError as exc:
                if exc.status == 409:  # another replica is creating (or removing) it
                    continue
                raise
            try:
                await container.start()
            except aiodocker.DockerError:
                with contextlib.suppress(aiodocker.DockerError):
                    await container.delete(force=True)
                raise
            log.info(
                "sandbox created",
                container=container.id[:12],
                seconds=round(time.monotonic() - started, 3),
            )
            return _Box(container, 0)
        raise SandboxError(f"could not get a sandbox container after {_CREATE_ATTEMPTS} tries")

    async def _box(self, task_id: str) -> _Box:
        box = self._boxes.get(task_id)
        if box is not None:
            return box
        lock = self._locks.setdefault(task_id, asyncio.Lock())
        async with lock:
            box = self._boxes.get(task_id)
            if box is None:
                with _docker_errors("starting the sandbox"):
                    box = await self._find_or_create(task_id)
                self._boxes[task_id] = box
            return box

    # --- ready execs ------------------------------------------------------------------

    def _prefetch(self, box: _Box) -> None:
        """Start the box's next waiting exec in the background (kept in ``box.refill``,
        cancelled and awaited by :meth:`_release`)."""
        if box.ready is None and (box.refill is None or box.refill.done()):
            box.refill = asyncio.create_task(self._make_ready(box), name="sandbox-ready")

    async def _make_ready(self, box: _Box) -> None:
        try:
            execution = await self._start_exec(
                box.container, domain.READY_ARGV, env=domain.BASE_ENV, stdin=True
            )
            stream = execution.start(detach=False)
            await stream.__aenter__()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            log.debug("could not start a ready exec", error=str(exc))
            return
        box.ready = _Ready(execution, stream)

    async def _take_ready(self, box: _Box) -> _Ready | None:
        """The box's waiting exec if it is alive (waiting for one on its way, which is
        never slower than starting a new one). The next one is started after the run
        (:meth:`_after_run`): starting an exec takes CPU from the container's quota, and
        the run would pay for it."""
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
            await self._close_ready(ready)
            return None
        return ready

    async def _close_ready(self, ready: _Ready) -> None:
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await ready.stream.close()

    async def _release(self, box: _Box | None) -> None:
        """Stop a forgotten box's background work and its waiting exec."""
        if box is None:
            return
        if box.refill is not None:
            box.refill.cancel()
            await asyncio.gather(box.refill, return_exceptions=True)
        ready, box.ready = box.ready, None
        if ready is not None:
            await self._close_ready(ready)

    async def _forget(self, task_id: str) -> None:
        await self._release(self._boxes.pop(task_id, None))

    async def destroy(self, task_id: str) -> bool:
        """Remove the task's container (force). The host workspace stays: it holds the
        task's artifacts for the user."""
        await self._forget(task_id)
        self._locks.pop(task_id, None)
        removed = False
        with _docker_errors("removing the sandbox"):
            for container in await self._find(task_id):
                try:
                    await container.delete(force=True)
                    removed = True
                except aiodocker.DockerError as exc:
                    if exc.status not in {404, 409}:  # gone, or removal already under way
                        raise
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._activity_marker(task_id).unlink, missing_ok=True)
        if removed:
            log.info("sandbox removed")
        return removed

    async def discard(self, task_id: str) -> None:
        """Remove a throwaway task entirely: its files (deleted from inside the
        container, as the sandbox user), its container and its empty host directory."""
        with contextlib.suppress(SandboxError):
            await self._run(
                task_id,
                [*domain.timeout_argv(30), "find", WORKSPACE, "-mindepth", "1", "-delete"],
                deadline_s=40,
                cap=4096,
            )
        await self.destroy(task_id)
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._workspace_dir(task_id).rmdir)

    # --- idle reaper ----------------------------------------------------------------

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            try:
                await self.reap_idle()
            except SandboxError as exc:
                log.warning("idle reaping failed", error=str(exc))

    async def reap_idle(self) -> int:
        """Remove task containers on this root unused for ``idle_ttl_s`` (by any
        replica: the activity marker is shared) with no exec running. Returns how many."""
        filters = {"label": [f"{LABEL_ROLE}={ROLE}", f"{LABEL_ROOT}={self._root}"]}
        with _docker_errors("listing sandboxes"):
            containers = await self._docker.containers.list(all=True, filters=filters)
        now, removed = time.time(), 0
        mine = {entry.name for entry in self._pool}
        for container in containers:
            names = [n.lstrip("/") for n in container["Names"]]
            orphan = next((n for n in names if n.startswith(POOL_PREFIX) and n not in mine), "")
            if orphan and now - float(container["Created"]) > self.config.idle_ttl_s:
                # Another replica's pool container, unclaimed for a whole TTL: most likely
                # that replica died. If it is alive, its claim of this one fails cleanly
                # (404) and it takes the next or starts cold.
                await self._discard_pool_entry(
                    _PoolEntry(container, orphan, Path(self._root) / POOL_DIR / orphan)
                )
                removed += 1
                continue
            task_id = next((n[len(NAME_PREFIX) :] for n in names if n.startswith(NAME_PREFIX)), "")
            if not task_id or self._active[task_id]:
                continue
            marker = self._activity_marker(task_id)
            used = await asyncio.to_thread(workspace.last_used, marker)
            last = used if used is not None else float(container["Created"])
            if now - last < self.config.idle_ttl_s or await self._exec_running(container):
                continue
            with structlog.contextvars.bound_contextvars(task_id=task_id):
                log.info("reaping an idle sandbox", idle_s=round(now - last))
                if await self.destroy(task_id):
                    removed += 1
        return removed

    async def _exec_running(self, container: Any) -> bool:
        """Whether any exec (maybe another replica's) is still running in it."""
        try:
            info = await container.show()
            for exec_id in info.get("ExecIDs") or []:
                details = await aiodocker.execs.Exec(self._docker, exec_id).inspect()
                command = details.get("ProcessConfig") or {}
                waiting = [command.get("entrypoint"), *command.get("arguments", [])]
                # A waiting exec is not use; a run that went through one touched the
                # activity marker when it started (idle_ttl_s > max_timeout_s).
                if details.get("Running") and waiting != domain.READY_ARGV:
                    return True
        except aiodocker.DockerError:
            return False
        return False

    # --- exec --------------------------------------------------------------------------

    async def _start_exec(
        self,
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

    async def _collect(
        self,
        execution: Any,
        *,
        deadline_s: float,
        cap: int,
        stdin: bytes | None = None,
        started_stream: Any = None,
    ) -> _Run:
        """Start the exec (unless ``started_stream`` is its started stream) and collect
        its capped output and exit code.

        ``deadline_s`` is the safety net around everything; the command itself carries
        its own ``timeout -s KILL``.
        """
        out, err = OutputCap(cap), OutputCap(cap)
        started = time.monotonic()
        fired = False

        async def feed(stream: Any, data: bytes) -> None:
            transport = _stdin_transport(stream)
            with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                await stream.write_in(data)
                transport.write_eof()

        async def drain(stream: Any) -> None:
            while (message := await stream.read_out()) is not None:
                (out if message.stream == _STREAM_STDOUT else err).feed(message.data)

        async def watch(feeding: asyncio.Task[None], draining: asyncio.Task[None]) -> None:
            # Only commands that read stdin to EOF (cat) get stdin, but one may die before
            # reading it all (cannot fork, bad path). Docker's stdin copy then blocks, and
            # the output stream with it, forever: once the process is gone, stop both.
            while not feeding.done():
                await asyncio.wait({feeding}, timeout=_FEED_POLL_S)  # not a fixed sleep
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
        return _Run(exit_code, out, err, duration, fired)

    async def _run(
        self,
        task_id: str,
        argv: Sequence[str],
        *,
        deadline_s: float,
        cap: int,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
    ) -> tuple[_Box, _Run]:
        """Exec in the task's container, creating it if needed.

        If the container this replica remembered was removed or stopped meanwhile, the
        exec cannot even be created: forget it and retry once with a fresh one. Once an
        exec exists it is never retried, so code never runs twice.
        """
        self._active[task_id] += 1
        workspace.touch(self._activity_marker(task_id))  # seen by other replicas' reapers
        try:
            return await self._run_once(
                task_id, argv, deadline_s=deadline_s, cap=cap, env=env, stdin=stdin
            )
        finally:
            self._active[task_id] -= 1
            if not self._active[task_id]:
                del self._active[task_id]
            # a utime on the local disk: microseconds, not worth a thread
            workspace.touch(self._activity_marker(task_id))

    async def _run_once(
        self,
        task_id: str,
        argv: Sequence[str],
        *,
        deadline_s: float,
        cap: int,
        env: Mapping[str, str] | None,
        stdin: bytes | None,
    ) -> tuple[_Box, _Run]:
        for attempt in (1, 2):
            box = await self._box(task_id)
            try:
                with _docker_errors("running in the sandbox"):
                    # Code runs in the box's waiting exec when there is one (same command,
                    # same environment, no exec start to wait for); file operations and
                    # runs with stdin start their own.
                    ready = None
                    if env is not None and stdin is None:
                        ready = await self._take_ready(box)
                    if ready is not None:
                        run = await self._collect(
                            ready.execution,
                            deadline_s=deadline_s,
                            cap=cap,
                            stdin=domain.ready_instruction(list(argv), env or {}),
                            started_stream=ready.stream,
                        )
                        return await self._after_run(task_id, box, run, deadline_s)
                    try:
                        execution = await self._start_exec(
                            box.container, argv, env=env, stdin=stdin is not None
                        )
                    except aiodocker.DockerError as exc:
                        if attempt == 1 and exc.status in {404, 409}:
                            await self._forget(task_id)
                            continue
                        raise
                    run = await self._collect(
                        execution, deadline_s=deadline_s, cap=cap, stdin=stdin
                    )
            except SandboxError:
                await self._forget(task_id)
                raise
            return await self._after_run(task_id, box, run, deadline_s)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _after_run(
        self, task_id: str, box: _Box, run: _Run, deadline_s: float
    ) -> tuple[_Box, _Run]:
        if self._boxes.get(task_id) is box:  # not forgotten meanwhile (destroy)
            self._prefetch(box)
        if run.safety_net_fired:
            log.error(
                "sandbox run outlived its deadline; removing the container",
                deadline_s=deadline_s,
            )
            await self.destroy(task_id)
        return box, run

    # --- operations ---------------------------------------------------------------------

    async def run_code(
        self,
        task_id: str,
        *,
        language: Language,
        code: str,
        timeout_s: float | None,
        env: Mapping[str, str],
        stdin: str | None,
    ) -> SandboxExecReply:
        """Run code under the time, memory and output limits; the typed outcome says how
        it ended. OOM detection is best effort: a run SIGKILLed before its limit counts
        as ``oom_killed`` when the container cgroup's ``oom_kill`` counter went up (or
        cannot be read); processes inside an exec do not mark the container OOMKilled."""
        limit, note = domain.clamp_timeout(timeout_s, self.config)
        full_env = domain.check_env(env)
        staged = domain.stdin_file() if stdin is not None else None
        argv = domain.code_argv(language, code, limit, staged)
        if stdin is not None and staged is not None:
            data = stdin.encode("utf-8", "surrogatepass")
            domain.check_upload(len(data), self.config, "stdin")
            await self._stage_stdin(task_id, staged, data)
        (box, run), (used, killed) = await self._guarded(
            task_id,
            self._run(
                task_id,
                argv,
                deadline_s=limit + self.config.safety_margin_s,
                cap=self.config.max_output_bytes,
                env=full_env,
            ),
        )
        oom = False
        if run.exit_code == EXIT_KILLED and run.duration_s < limit and not killed:
            with contextlib.suppress(SandboxError, aiodocker.DockerError, aiohttp.ClientError):
                count = await self._oom_kills(box.container)
                oom = count is None or box.oom_kills is None or count > box.oom_kills
                box.oom_kills = count
        truncated = run.stdout.truncated or run.stderr.truncated
        outcome = domain.classify(
            run.exit_code,
            run.duration_s,
            limit,
            safety_net_fired=run.safety_net_fired,
            oom_killed=oom,
            truncated=truncated,
        )
        notes = [note] if note else []
        if killed:
            outcome = ExecOutcome.ERROR
        if used > self.config.workspace_max_bytes:
            notes.append(domain.over_cap_note(used, self.config, killed=killed))
        if outcome is ExecOutcome.OOM_KILLED:
            notes.append(
                f"[sandbox: killed for exceeding the {self.config.memory_mb} MB memory limit]"
            )
        stdout, stdout_cut = domain.fit_json(run.stdout.text(), _REPLY_JSON_BUDGET // 2)
        stderr, stderr_cut = domain.fit_json(run.stderr.text(), _REPLY_JSON_BUDGET // 2)
        if stdout_cut or stderr_cut:  # binary output: escaping made it too big for one reply
            notes.append("[sandbox: output cut further to fit in the reply]")
            if outcome in {ExecOutcome.OK, ExecOutcome.ERROR}:
                outcome = ExecOutcome.OUTPUT_TRUNCATED
        stderr = "\n".join(part for part in (stderr, *notes) if part)
        log.info(
            "ran code",
            language=language.value,
            exit_code=run.exit_code,
            outcome=outcome.value,
            duration_ms=round(run.duration_s * 1000, 1),
        )
        return SandboxExecReply(
            exit_code=run.exit_code,
            stdout=stdout,
            stderr=stderr,
            duration_ms=round(run.duration_s * 1000, 3),
            outcome=outcome,
        )

    async def _usage(self, task_id: str) -> int:
        return await asyncio.to_thread(workspace.disk_usage, self._workspace_dir(task_id))

    async def _guarded(
        self, task_id: str, running: Awaitable[tuple[_Box, _Run]]
    ) -> tuple[tuple[_Box, _Run], tuple[int, bool]]:
        """Await a run while watching the workspace's disk usage; a run that grows it
        past the cap (or past what it held at the start, if already over) is stopped by
        replacing the container. Returns the run and (usage after it, stopped?)."""
        cap = self.config.workspace_max_bytes
        stopped = asyncio.Event()

        async def watch() -> None:
            limit = max(cap, await self._usage(task_id))
            interval = self.config.guard_interval_s
            while True:
                await asyncio.sleep(interval)
                started = time.monotonic()
                used = await self._usage(task_id)
                # big trees cost more to walk: look less often, at most 10% of a core
                interval = max(self.config.guard_interval_s, 10 * (time.monotonic() - started))
                if used > limit:
                    log.warning("run stopped: workspace over its cap", used=used, cap=cap)
                    stopped.set()
                    await self.destroy(task_id)
                    return

        guard = asyncio.create_task(watch(), name=f"sandbox-guard-{task_id}")
        try:
            result = await running
        finally:
            if not stopped.is_set():
                guard.cancel()
            # else let it finish replacing the container: the next call must not find
            # the old one half-removed
            # the guard's own failure (engine trouble while replacing) is only logged:
            # the run's result is what the caller needs
            (outcome,) = await asyncio.gather(guard, return_exceptions=True)
            if isinstance(outcome, Exception):
                log.warning("workspace guard failed", error=str(outcome))
        return result, (await self._usage(task_id), stopped.is_set())

    async def _feed(self, task_id: str, argv: list[str], data: bytes, what: str) -> None:
        """Run a short file operation that reads ``data`` on its stdin; raise on failure."""
        limit = self.config.file_op_timeout_s
        _, run = await self._run(
            task_id,
            argv,
            deadline_s=limit + self.config.safety_margin_s,
            cap=8192,
            stdin=data,
        )
        if run.exit_code != 0:
            reason = domain.describe_failure(run.stderr.data, run.stdout.data, run.exit_code)
            raise SandboxError(f"could not {what}: {reason}")

    async def _stage_stdin(self, task_id: str, path: str, data: bytes) -> None:
        argv = domain.stage_stdin_argv(path, self.config.file_op_timeout_s)
        await self._feed(task_id, argv, data, "pass stdin to the run")

    async def write_file(self, task_id: str, path: str, content: str) -> SandboxWriteFileReply:
        """Write a file as the sandbox user from inside the container (parents created).

        Data goes through the exec's stdin to ``cat``, not ``put_archive``: the
        archive API extracts as root on the daemon side, where a symlink swapped in by
        agent code races the daemon's path checks; ``cat`` as uid 65534 inside the
        container cannot write anywhere but /workspace and /tmp.
        """
        relative = domain.workspace_path(path)
        data = content.encode("utf-8", "surrogatepass")
        domain.check_upload(len(data), self.config, f"the content of {relative}")
        domain.check_room(await self._usage(task_id), len(data), self.config)
        argv = domain.write_argv(relative, self.config.file_op_timeout_s)
        await self._feed(task_id, argv, data, f"write {relative}")
        return SandboxWriteFileReply(path=relative, size=len(data))

    async def read_file(self, task_id: str, path: str, max_bytes: int) -> SandboxReadFileReply:
        """Read up to ``max_bytes`` (and at most the service's ``max_read_bytes``)."""
        relative = domain.workspace_path(path)
        wanted = min(max_bytes, self.config.max_read_bytes)
        limit = self.config.file_op_timeout_s
        _, run = await self._run(
            task_id,
            domain.read_argv(relative, wanted, limit),
            deadline_s=limit + self.config.safety_margin_s,
            cap=wanted + 64,
        )
        if run.exit_code != 0:
            reason = domain.describe_failure(run.stderr.data, run.stdout.data, run.exit_code)
            raise SandboxError(f"could not read {relative}: {reason}")
        size, content = domain.parse_read_output(run.stdout.data)
        text, cut = domain.fit_json(content.decode("utf-8", "replace"), _REPLY_JSON_BUDGET)
        return SandboxReadFileReply(
            path=relative, content=text, size=size, truncated=cut or len(content) < size
        )

    async def list_files(self, task_id: str) -> SandboxListFilesReply:
        """Regular files under /workspace with their sizes, sorted by path.

        At most ``max_list_files`` entries (and ``max_list_bytes`` of names) come back,
        so the reply fits in one NATS message; a cut listing is logged.
        """
        limit = self.config.file_op_timeout_s
        _, run = await self._run(
            task_id,
            domain.list_argv(limit),
            deadline_s=limit + self.config.safety_margin_s,
            cap=self.config.max_list_bytes,
        )
        if run.exit_code not in {0, 1}:  # 1: some directory was unreadable; keep the rest
            reason = domain.describe_failure(run.stderr.data, run.stdout.data, run.exit_code)
            raise SandboxError(f"could not list the workspace: {reason}")
        files = domain.parse_file_list(run.stdout.data, complete=not run.stdout.truncated)
        cut = run.stdout.truncated or len(files) > self.config.max_list_files
        if cut:
            log.warning("workspace listing cut", shown=min(len(files), self.config.max_list_files))
            files = files[: self.config.max_list_files]
        return SandboxListFilesReply(
            files=[FileInfo(path=p, size=s) for p, s in files], truncated=cut
        )
