"""The engine and the containers on it: connecting (with the image check), the
hardened container config, names and labels, and a task's workspace directory.

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
  asyncio deadline (:mod:`._exec`); if that safety net ever fires, the container is
  removed (it is recreated on the next call; the workspace files stay on the host);
* ``fsize`` ulimit = the workspace cap (no single file can pass it), and a guard
  that polls the workspace's disk usage while code runs and stops a run that grows
  it past ``workspace_max_mb`` (:mod:`._guard`; the container is replaced, files
  are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog

from agentbus.contracts import subjects

from .. import domain
from ..domain import (
    SANDBOX_GID,
    SANDBOX_UID,
    SANDBOX_USER,
    WORKSPACE,
    SandboxConfig,
    SandboxUnavailable,
)

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


async def connect(config: SandboxConfig, docker_url: str | None) -> Any:
    """A client of the engine, checked to answer and to hold the sandbox image.

    Raises SandboxUnavailable with what to do: there is no unsandboxed fallback.
    """
    hint = "run `make setup` (or `make sandbox-image` once Docker is running)"
    try:
        docker = aiodocker.Docker(
            url=docker_url, timeout=aiohttp.ClientTimeout(total=120, connect=10)
        )
    except (AssertionError, ValueError, OSError) as exc:  # no socket found, bad URL
        raise SandboxUnavailable(f"no Docker engine found ({exc!r}); {hint}") from exc
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
    return docker


def root_filters(root: str) -> dict[str, list[str]]:
    """Every sandbox container (task or pool) of this workspace root."""
    return {"label": [f"{LABEL_ROLE}={ROLE}", f"{LABEL_ROOT}={root}"]}


def container_config(
    config: SandboxConfig, root: str, labels: Mapping[str, str], source: Path
) -> dict[str, Any]:
    """The hardened container, bind-mounting ``source`` at /workspace."""
    memory = config.memory_mb * 1024 * 1024
    # A single file stops a little under the cap (what its blocks and the directory take
    # would put it over), so one big file gets "File too large", not the guard's stop.
    fsize = max(config.workspace_max_bytes - 2**20, config.workspace_max_bytes // 2)
    return {
        "Image": config.image,
        "Cmd": ["sleep", "infinity"],
        "User": SANDBOX_USER,
        "WorkingDir": WORKSPACE,
        "Env": [f"{k}={v}" for k, v in domain.BASE_ENV.items()],
        "Labels": {LABEL_ROLE: ROLE, LABEL_ROOT: root, **labels},
        "NetworkDisabled": True,
        "HostConfig": {
            # docker-init (tini) as PID 1 reaps the orphans a kill at the time limit
            # leaves; under a bare `sleep` they stay zombies and eat the pids limit.
            "Init": True,
            "NetworkMode": "none",
            "Memory": memory,
            "MemorySwap": memory,  # equal to Memory: no swap
            "NanoCpus": int(config.cpus * 1e9),
            "PidsLimit": config.pids_limit,
            "ReadonlyRootfs": True,
            "Tmpfs": {domain.SANDBOX_TMP: f"rw,nosuid,nodev,size={config.tmp_size_mb}m"},
            "SecurityOpt": ["no-new-privileges:true"],
            "CapDrop": ["ALL"],
            "Ulimits": [
                {"Name": "nofile", "Soft": config.nofile, "Hard": config.nofile},
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


async def start_or_remove(container: Any) -> None:
    """Start a created container; if it will not start, remove it and raise."""
    try:
        await container.start()
    except aiodocker.DockerError:
        with contextlib.suppress(aiodocker.DockerError):
            await container.delete(force=True)
        raise


def prepare_workspace(path: Path) -> None:
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


async def find(docker: Any, task_id: str) -> list[Any]:
    """The task's container, by its engine-wide unique name (pool containers carry
    no task label: they get their task by rename)."""
    name = f"^/{NAME_PREFIX}{subjects.check_token(task_id)}$"
    filters = {"label": [f"{LABEL_ROLE}={ROLE}"], "name": [name]}
    containers: list[Any] = await docker.containers.list(all=True, filters=filters)
    return containers
