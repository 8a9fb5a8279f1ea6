"""Sandbox service entry point: ``python -m agentbus.sandbox`` or ``agentbus-sandbox``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog
from faststream import FastStream
from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.contracts import HealthReply, HealthRequest, subjects
from agentbus.core.bus import rpc
from agentbus.core.ports import RpcError
from agentbus.core.service import Service, for_docs, run
from agentbus.core.settings import CommonSettings

from . import routes
from .adapters.docker import DockerSandbox
from .adapters.metrics import SandboxMetrics
from .domain import SandboxConfig
from .usecases import SandboxRequests

log = structlog.get_logger(__name__)


def _default_workspace_root() -> Path:
    home = os.environ.get("AGENTBUS_HOME") or "~/.agentbus"
    return Path(home).expanduser() / "workspaces"


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_SANDBOX_", extra="ignore")

    image: str = Field("agentbus-sandbox:latest", description="Image every sandbox runs.")
    docker_url: str | None = Field(
        None, description="Docker engine URL; default: DOCKER_HOST or the local socket."
    )
    workspace_root: Path = Field(
        default_factory=_default_workspace_root,
        description=(
            "Host directory holding one workspace per task, bind-mounted at /workspace. "
            "It must be on the Docker engine's host. Default: $AGENTBUS_HOME/workspaces."
        ),
    )
    memory_mb: int = Field(512, ge=16, description="Memory per sandbox (no swap), MB.")
    cpus: float = Field(1.0, gt=0, description="CPUs per sandbox.")
    pids_limit: int = Field(128, ge=16, description="Most processes per sandbox.")
    nofile: int = Field(1024, ge=64, description="Most open files per process.")
    default_timeout_s: float = Field(30, gt=0, description="Time limit of a run by default.")
    max_timeout_s: float = Field(600, gt=0, description="Longest time limit a run may ask for.")
    max_output_bytes: int = Field(
        64 * 1024, ge=1024, le=256 * 1024, description="Cap on stdout and on stderr per run."
    )
    max_read_bytes: int = Field(
        512 * 1024, ge=1024, le=768 * 1024, description="Most bytes read_file returns."
    )
    concurrency: int = Field(
        8, ge=1, description="Requests of each kind one replica serves at once."
    )
    tmp_size_mb: int = Field(64, ge=1, description="Size of each sandbox's tmpfs /tmp, MB.")
    workspace_max_mb: int = Field(
        1024,
        ge=1,
        description=(
            "Disk cap of one task's workspace, MB. Also the largest file a sandbox may "
            "write (fsize ulimit); a run that grows the workspace past it is stopped."
        ),
    )
    max_upload_bytes: int = Field(
        512 * 1024,
        ge=1024,
        le=768 * 1024,
        description="Most bytes one write_file (or an exec's stdin) may carry.",
    )
    pool_size: int = Field(
        2, ge=0, description="Started containers each replica keeps ready (0: no pool)."
    )
    idle_ttl_s: float = Field(
        900,
        ge=0,
        description="Remove a task's container after this long unused (0: never).",
    )
    reap_interval_s: float = Field(
        30, gt=0, description="How often idle containers are looked for, seconds."
    )

    def sandbox_config(self) -> SandboxConfig:
        return SandboxConfig(
            image=self.image,
            workspace_root=self.workspace_root.expanduser(),
            memory_mb=self.memory_mb,
            cpus=self.cpus,
            pids_limit=self.pids_limit,
            nofile=self.nofile,
            default_timeout_s=self.default_timeout_s,
            max_timeout_s=self.max_timeout_s,
            max_output_bytes=self.max_output_bytes,
            max_read_bytes=self.max_read_bytes,
            tmp_size_mb=self.tmp_size_mb,
            workspace_max_mb=self.workspace_max_mb,
            max_upload_bytes=self.max_upload_bytes,
            pool_size=self.pool_size,
            idle_ttl_s=self.idle_ttl_s,
            reap_interval_s=self.reap_interval_s,
        )


async def _other_replicas_running(broker: NatsBroker) -> bool:
    """Whether another sandbox replica answers health pings (ours is not up yet)."""
    try:
        await rpc(
            broker, subjects.health_subject("sandbox"), HealthRequest(), HealthReply, timeout=1.0
        )
    except RpcError:
        return False
    return True


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    service = Service.create("sandbox", settings, tracer_provider=tracer_provider)
    service.serve(routes.build_router(settings.bus, concurrency=settings.concurrency))
    tracer = trace.get_tracer("agentbus.sandbox", tracer_provider=service.tracer_provider)
    metrics = SandboxMetrics(service.metrics)
    opened = contextlib.AsyncExitStack()

    async def open_sandbox() -> None:
        # Raises SandboxUnavailable (engine down, image missing): start-up fails with
        # what to do. There is no unsandboxed fallback.
        sandbox = await DockerSandbox.open(settings.sandbox_config(), settings.docker_url)
        opened.push_async_callback(sandbox.close)
        # Containers of this workspace root left by earlier runs: all of them when no
        # other replica is alive, else only stopped ones (running ones may be in use).
        others = await _other_replicas_running(service.broker)
        removed = await sandbox.reap(include_running=not others)
        if removed:
            log.info("removed leftover sandboxes", count=removed, only_stopped=others)
        sandbox.start()  # pool refill and idle reaper, after the clean-up above
        metrics.watch_pool(lambda: sandbox.pool_available)
        uses = SandboxRequests(sandbox=sandbox, tracer=tracer, metrics=metrics)
        # Ready: the Docker engine answers. The routes are subscribed only after this
        # hook, so no request meets a sandbox that is not open yet.
        service.readiness.append(uses.ready)
        service.provide(routes.USES, uses)

    async def close_sandbox() -> None:
        await opened.aclose()

    return service.app(on_startup=[open_sandbox], after_shutdown=[close_sandbox])


def main() -> None:
    run("sandbox", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return for_docs(create_app(Settings()))
