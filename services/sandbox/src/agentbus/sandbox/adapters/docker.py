"""The Docker engine: the sandbox service's one entry to it (:class:`DockerSandbox`).

One container per task, found by its engine-wide unique name
``agentbus-sbx-<task_id>`` so every replica on the same engine finds the same
container; created on first use (or claimed from the warm pool), reused by every
step, removed when the task ends. Agent code and every file operation run inside it
through ``docker exec`` as uid 65534; nothing agent-controlled is ever opened on the
host side (see :mod:`agentbus.sandbox.domain`).

The parts, each in its own module:

* :mod:`._containers`: connecting (engine and image check), the hardened container
  config, names and labels, workspace directories;
* :mod:`._exec`: one command through ``docker exec`` under a deadline, with capped
  output; engine errors as SandboxError / SandboxUnavailable;
* :mod:`._box`: a task's container as this replica knows it, and its waiting exec
  (the loader that saves a run the exec start);
* :mod:`._pool`: the warm pool of started containers, claimed by rename;
* :mod:`._guard`: the workspace guard that stops a run filling the disk;
* :mod:`._cpu` and :mod:`.cgroup`: CPU time of a run, the container cgroup's
  counter read before and after it (on the host, or inside the container when the
  host's cgroups are out of sight).

Idle reaper (here): every op touches ``<root>/.activity/<task_id>``; a background
task removes task containers (of any replica on this root) unused for
``idle_ttl_s`` that have no exec running. The workspace stays; the next call gets a
fresh container on it (never a warm-pool one: a claim is refused while the task's
workspace exists), so a task paused for longer keeps its files, though not /tmp
or background processes. It also removes other replicas' pool containers left
unclaimed for a whole TTL (a replica that died without cleaning up).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Mapping, Sequence
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
from ..domain import EXIT_KILLED, WORKSPACE, SandboxConfig, SandboxError
from . import _containers, workspace
from ._box import Box, prefetch, release, take_ready
from ._containers import ACTIVITY_DIR, LABEL_TASK, NAME_PREFIX, POOL_DIR, POOL_PREFIX
from ._cpu import CpuMeter
from ._exec import (
    Run,
    collect,
    docker_errors,
    exec_running,
    is_running,
    oom_kills,
    start_exec,
)
from ._guard import guarded
from ._pool import PoolEntry, WarmPool, remove_stale_dirs
from ._pool import discard as discard_pool_entry

__all__ = ["DockerSandbox"]

log = structlog.get_logger(__name__)

_CREATE_ATTEMPTS = 4
_REPLY_JSON_BUDGET = 768 * 1024  # leaves room under NATS's default 1 MB max_payload


async def _going(container: Any, within_s: float = 5.0) -> bool:
    """Whether the container stops within ``within_s``: a removal under way kills
    its processes first and the engine reports it running until they are gone."""
    deadline = time.monotonic() + within_s
    while await is_running(container):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class DockerSandbox:
    """Sandbox containers on one Docker engine; build with :meth:`open`."""

    def __init__(self, docker: Any, config: SandboxConfig) -> None:
        self._docker = docker
        self.config = config
        self._root = str(config.workspace_root.resolve())
        self._boxes: dict[str, Box] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._active: collections.Counter[str] = collections.Counter()
        self._cpu = CpuMeter()
        self._pool = WarmPool(docker, config, self._root, self._cpu)
        self._background: list[asyncio.Task[None]] = []

    # --- life cycle ------------------------------------------------------------------

    @classmethod
    async def open(cls, config: SandboxConfig, docker_url: str | None = None) -> DockerSandbox:
        """Connect and check the engine answers and the image exists.

        Raises SandboxUnavailable with what to do: there is no unsandboxed fallback.
        """
        return cls(await _containers.connect(config, docker_url), config)

    def start(self) -> None:
        """Start the pool refill and the idle reaper (after :meth:`reap`, which would
        remove the pool). :meth:`close` cancels and awaits both."""
        if self._background:
            return
        if self.config.pool_size > 0:
            self._background.append(asyncio.create_task(self._pool.refill(), name="sandbox-pool"))
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
        await self._pool.close()
        await self._docker.close()

    @property
    def pool_available(self) -> int:
        """Started containers waiting in this replica's pool."""
        return len(self._pool)

    async def wait_pool_full(self, timeout: float = 30) -> None:
        """Wait until the pool holds ``pool_size`` containers (tests, benchmarks)."""
        await self._pool.wait_full(timeout)

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
        filters = _containers.root_filters(self._root)
        removed = 0
        with docker_errors("listing leftover sandboxes"):
            containers = await self._docker.containers.list(all=True, filters=filters)
        for container in containers:
            if not include_running and container["State"] == "running":
                continue
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
                removed += 1
        with docker_errors("listing pool containers"):
            alive = {
                name.lstrip("/")
                for c in await self._docker.containers.list(all=True, filters=filters)
                for name in c["Names"]
            }
        await asyncio.to_thread(remove_stale_dirs, self._root, alive)
        return removed

    # --- boxes -------------------------------------------------------------------------

    def _workspace_dir(self, task_id: str) -> Path:
        return Path(self._root) / subjects.check_token(task_id)

    def _activity_marker(self, task_id: str) -> Path:
        return Path(self._root) / ACTIVITY_DIR / task_id

    async def _find_or_create(self, task_id: str) -> Box:
        claimed = await self._pool.claim(task_id, self._workspace_dir(task_id))
        if claimed is not None:
            return claimed
        for attempt in range(_CREATE_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.2 * attempt)
            for found in await _containers.find(self._docker, task_id):
                state = found["State"]
                if state == "running":
                    return Box(found, await oom_kills(found))
                if state in {"created", "exited"}:
                    try:
                        await found.start()
                    except aiodocker.DockerError:
                        log.warning("restarting a stopped sandbox failed; recreating it")
                    else:
                        return Box(found, await oom_kills(found))
                with contextlib.suppress(aiodocker.DockerError):
                    await found.delete(force=True)
            source = self._workspace_dir(task_id)
            await asyncio.to_thread(_containers.prepare_workspace, source)
            started = time.monotonic()
            try:
                container = await self._docker.containers.create(
                    _containers.container_config(
                        self.config, self._root, {LABEL_TASK: task_id}, source
                    ),
                    name=f"{NAME_PREFIX}{task_id}",
                )
            except aiodocker.DockerError as exc:
                if exc.status == 409:  # another replica is creating (or removing) it
                    continue
                raise
            await _containers.start_or_remove(container)
            log.info(
                "sandbox created",
                container=container.id[:12],
                seconds=round(time.monotonic() - started, 3),
            )
            return Box(container, 0)
        raise SandboxError(f"could not get a sandbox container after {_CREATE_ATTEMPTS} tries")

    async def _box(self, task_id: str) -> Box:
        box = self._boxes.get(task_id)
        if box is not None:
            return box
        lock = self._locks.setdefault(task_id, asyncio.Lock())
        async with lock:
            box = self._boxes.get(task_id)
            if box is None:
                with docker_errors("starting the sandbox"):
                    box = await self._find_or_create(task_id)
                self._boxes[task_id] = box
            return box

    async def _forget(self, task_id: str) -> None:
        await release(self._boxes.pop(task_id, None))

    async def destroy(self, task_id: str) -> bool:
        """Remove the task's container (force). The host workspace stays: it holds the
        task's artifacts for the user."""
        await self._forget(task_id)
        self._locks.pop(task_id, None)
        removed = False
        with docker_errors("removing the sandbox"):
            for container in await _containers.find(self._docker, task_id):
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
        filters = _containers.root_filters(self._root)
        mine = self._pool.names()  # before listing: a name claimed meanwhile stays in it
        with docker_errors("listing sandboxes"):
            containers = await self._docker.containers.list(all=True, filters=filters)
        now, removed = time.time(), 0
        for container in containers:
            names = [n.lstrip("/") for n in container["Names"]]
            orphan = next((n for n in names if n.startswith(POOL_PREFIX) and n not in mine), "")
            if orphan and now - float(container["Created"]) > self.config.idle_ttl_s:
                # Another replica's pool container, unclaimed for a whole TTL: most likely
                # that replica died. If it is alive, its claim of this one fails cleanly
                # (404) and it takes the next or starts cold.
                await discard_pool_entry(
                    PoolEntry(container, orphan, Path(self._root) / POOL_DIR / orphan)
                )
                removed += 1
                continue
            task_id = next((n[len(NAME_PREFIX) :] for n in names if n.startswith(NAME_PREFIX)), "")
            if not task_id or self._active[task_id]:
                continue
            marker = self._activity_marker(task_id)
            used = await asyncio.to_thread(workspace.last_used, marker)
            last = used if used is not None else float(container["Created"])
            if now - last < self.config.idle_ttl_s or await exec_running(self._docker, container):
                continue
            with structlog.contextvars.bound_contextvars(task_id=task_id):
                log.info("reaping an idle sandbox", idle_s=round(now - last))
                if await self.destroy(task_id):
                    removed += 1
        return removed

    # --- runs --------------------------------------------------------------------------

    async def _run(
        self,
        task_id: str,
        argv: Sequence[str],
        *,
        deadline_s: float,
        cap: int,
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        measure_cpu: bool = False,
    ) -> tuple[Box, Run]:
        """Exec in the task's container, creating it if needed; with ``measure_cpu``
        the run carries the CPU time its container used meanwhile.

        If the container this replica remembered was removed or stopped meanwhile, the
        exec cannot even be created: forget it and retry once with a fresh one. Once an
        exec exists it is never retried, so code never runs twice.
        """
        self._active[task_id] += 1
        workspace.touch(self._activity_marker(task_id))  # seen by other replicas' reapers
        try:
            return await self._run_once(
                task_id,
                argv,
                deadline_s=deadline_s,
                cap=cap,
                env=env,
                stdin=stdin,
                measure_cpu=measure_cpu,
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
        measure_cpu: bool,
    ) -> tuple[Box, Run]:
        for attempt in (1, 2):
            box = await self._box(task_id)
            try:
                with docker_errors("running in the sandbox"):
                    # Code runs in the box's waiting exec when there is one (same command,
                    # same environment, no exec start to wait for); file operations and
                    # runs with stdin start their own.
                    ready = None
                    if env is not None and stdin is None:
                        ready = await take_ready(box)
                    # The whole container's CPU counter, read around the run: one
                    # container serves one task, so all of it is the task's.
                    before = await self._cpu.usage(box) if measure_cpu else None
                    if ready is not None:
                        run = await collect(
                            ready.execution,
                            deadline_s=deadline_s,
                            cap=cap,
                            stdin=domain.ready_instruction(list(argv), env or {}),
                            started_stream=ready.stream,
                        )
                    else:
                        try:
                            execution = await start_exec(
                                box.container, argv, env=env, stdin=stdin is not None
                            )
                        except aiodocker.DockerError as exc:
                            if attempt == 1 and exc.status in {404, 409}:
                                await self._forget(task_id)
                                continue
                            raise
                        run = await collect(execution, deadline_s=deadline_s, cap=cap, stdin=stdin)
            except SandboxError:
                await self._forget(task_id)
                raise
            return await self._after_run(
                task_id, box, run, deadline_s, measure_cpu=measure_cpu, cpu_before=before
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _after_run(
        self,
        task_id: str,
        box: Box,
        run: Run,
        deadline_s: float,
        *,
        measure_cpu: bool,
        cpu_before: int | None,
    ) -> tuple[Box, Run]:
        if measure_cpu:  # first: before the next waiting exec starts, or a removal
            run.cpu_seconds = await self._cpu.since(box, cpu_before)
        if self._boxes.get(task_id) is box:  # not forgotten meanwhile (destroy)
            prefetch(box)
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
                measure_cpu=True,
            ),
        )
        oom = removed = False
        if run.exit_code == EXIT_KILLED and run.duration_s < limit and not killed:
            with contextlib.suppress(SandboxError, aiodocker.DockerError, aiohttp.ClientError):
                # Killed early: by the OOM killer, or the container is being removed
                # (the task was cancelled or ended), which also stops the counter read.
                count = await oom_kills(box.container)
                if count is None:
                    removed = await _going(box.container)
                oom = not removed and (
                    count is None or box.oom_kills is None or count > box.oom_kills
                )
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
        if killed or removed:
            outcome = ExecOutcome.ERROR
        if removed:
            notes.append("[sandbox: stopped: the task's sandbox was removed (cancelled or ended)]")
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
            cpu_seconds=round(run.cpu_seconds, 3),
        )
        return SandboxExecReply(
            exit_code=run.exit_code,
            stdout=stdout,
            stderr=stderr,
            duration_ms=round(run.duration_s * 1000, 3),
            outcome=outcome,
            cpu_seconds=round(run.cpu_seconds, 6),
        )

    async def _usage(self, task_id: str) -> int:
        return await asyncio.to_thread(workspace.disk_usage, self._workspace_dir(task_id))

    async def _guarded(
        self, task_id: str, running: Awaitable[tuple[Box, Run]]
    ) -> tuple[tuple[Box, Run], tuple[int, bool]]:
        """Await a run under the workspace guard (:mod:`._guard`). Returns the run and
        (usage after it, stopped?)."""

        async def stop() -> None:
            box = self._boxes.get(task_id)
            if box is not None:  # the run's CPU so far: its container goes now
                await self._cpu.usage(box)
            await self.destroy(task_id)

        return await guarded(
            running,
            cap=self.config.workspace_max_bytes,
            interval_s=self.config.guard_interval_s,
            usage=lambda: self._usage(task_id),
            stop=stop,
            name=f"sandbox-guard-{task_id}",
        )

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
