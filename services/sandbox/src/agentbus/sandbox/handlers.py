"""Sandbox handlers: request/reply for code and files, and container clean-up when a
task ends. Each handler parses, calls the Docker adapter, and answers; an expected
failure (bad path, engine trouble) becomes ``ok=False`` with the reason, never a
crash and never a caller left waiting. Malformed requests are answered ``ok=False``
by the bus's dead-letter middleware (``agentbus.core.bus``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Gauge, Histogram

from agentbus.contracts import (
    Event,
    Reply,
    SandboxDestroyReply,
    SandboxDestroyRequest,
    SandboxExecReply,
    SandboxExecRequest,
    SandboxListFilesReply,
    SandboxListFilesRequest,
    SandboxReadFileReply,
    SandboxReadFileRequest,
    SandboxWriteFileReply,
    SandboxWriteFileRequest,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.bus import event_subscriber
from agentbus.core.settings import BusSettings

from .adapters.docker import DockerSandbox
from .domain import InvalidRequest, SandboxError

log = structlog.get_logger(__name__)

R = TypeVar("R", bound=Reply)


@dataclass
class SandboxDeps:
    broker: NatsBroker
    bus: BusSettings
    concurrency: int = 8
    sandbox: DockerSandbox | None = None
    metrics: SandboxMetrics | None = None
    tracer: Tracer = field(default_factory=lambda: trace.get_tracer("agentbus.sandbox"))

    @property
    def ready(self) -> DockerSandbox:
        if self.sandbox is None:
            raise SandboxError("the sandbox service is still starting; try again")
        return self.sandbox

    async def ping(self) -> bool:
        return self.sandbox is not None and await self.sandbox.ping()


class SandboxMetrics:
    def __init__(self, registry: CollectorRegistry, pool_size: Callable[[], int]) -> None:
        self.exec_seconds = Histogram(
            "agentbus_sandbox_exec_seconds",
            "Code runs in the sandbox, by language and typed outcome.",
            ("language", "outcome"),
            registry=registry,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        pool = Gauge(
            "agentbus_sandbox_pool_size",
            "Warm containers waiting in this replica's pool.",
            registry=registry,
        )
        pool.set_function(pool_size)


async def _answer(
    deps: SandboxDeps,
    task_id: str,
    reply_type: type[R],
    call: Callable[[DockerSandbox], Awaitable[R]],
) -> R:
    """Run one request with task_id bound in the logs; expected failures become ok=False."""
    with structlog.contextvars.bound_contextvars(task_id=task_id):
        try:
            return await call(deps.ready)
        except InvalidRequest as exc:
            log.info("refused request", reply=reply_type.__name__, error=str(exc))
            return reply_type(ok=False, error=str(exc))
        except SandboxError as exc:
            log.warning("request failed", reply=reply_type.__name__, error=str(exc))
            return reply_type(ok=False, error=str(exc))


async def _destroy(sandbox: DockerSandbox, task_id: str) -> SandboxDestroyReply:
    return SandboxDestroyReply(destroyed=await sandbox.destroy(task_id))


async def _task_ended(deps: SandboxDeps, event: Event) -> None:
    """Remove an ended task's container. Engine errors raise, so the event is retried
    with back-off (and dead-lettered after ``max_deliver`` tries)."""
    with structlog.contextvars.bound_contextvars(task_id=event.task_id):
        if await deps.ready.destroy(event.task_id):
            log.info("removed the sandbox of an ended task", event_type=event.event_type)


def register(deps: SandboxDeps) -> None:
    """Subscribe the sandbox's handlers on its broker."""
    broker, queue, workers = deps.broker, subjects.SANDBOX_QUEUE, deps.concurrency

    @broker.subscriber(subjects.SANDBOX_EXEC, queue=queue, max_workers=workers)
    async def run_code(req: SandboxExecRequest) -> SandboxExecReply:
        attributes = {semconv.TASK_ID: req.task_id, semconv.SANDBOX_LANGUAGE: req.language.value}
        with deps.tracer.start_as_current_span(
            semconv.SPAN_SANDBOX_EXEC, attributes=attributes
        ) as span:
            started = time.perf_counter()
            reply = await _answer(
                deps,
                req.task_id,
                SandboxExecReply,
                lambda sandbox: sandbox.run_code(
                    req.task_id,
                    language=req.language,
                    code=req.code,
                    timeout_s=req.timeout_s,
                    env=req.env,
                    stdin=req.stdin,
                ),
            )
            outcome = reply.outcome.value if reply.ok else "refused"
            span.set_attribute(semconv.SANDBOX_OUTCOME, outcome)
            if reply.exit_code is not None:
                span.set_attribute(semconv.SANDBOX_EXIT_CODE, reply.exit_code)
            if deps.metrics is not None:
                deps.metrics.exec_seconds.labels(req.language.value, outcome).observe(
                    time.perf_counter() - started
                )
            return reply

    @broker.subscriber(subjects.SANDBOX_WRITE_FILE, queue=queue, max_workers=workers)
    async def write_file(req: SandboxWriteFileRequest) -> SandboxWriteFileReply:
        return await _answer(
            deps,
            req.task_id,
            SandboxWriteFileReply,
            lambda sandbox: sandbox.write_file(req.task_id, req.path, req.content),
        )

    @broker.subscriber(subjects.SANDBOX_READ_FILE, queue=queue, max_workers=workers)
    async def read_file(req: SandboxReadFileRequest) -> SandboxReadFileReply:
        return await _answer(
            deps,
            req.task_id,
            SandboxReadFileReply,
            lambda sandbox: sandbox.read_file(req.task_id, req.path, req.max_bytes),
        )

    @broker.subscriber(subjects.SANDBOX_LIST_FILES, queue=queue, max_workers=workers)
    async def list_files(req: SandboxListFilesRequest) -> SandboxListFilesReply:
        return await _answer(
            deps,
            req.task_id,
            SandboxListFilesReply,
            lambda sandbox: sandbox.list_files(req.task_id),
        )

    @broker.subscriber(subjects.SANDBOX_DESTROY, queue=queue, max_workers=workers)
    async def destroy(req: SandboxDestroyRequest) -> SandboxDestroyReply:
        return await _answer(
            deps, req.task_id, SandboxDestroyReply, lambda sandbox: _destroy(sandbox, req.task_id)
        )

    # A task's end removes its container: one durable per terminal event type, each
    # shared by all replicas.
    lifecycle = subjects.SANDBOX_LIFECYCLE_DURABLE

    @event_subscriber(broker, TaskCompleted, durable=f"{lifecycle}-completed", settings=deps.bus)
    async def on_completed(event: TaskCompleted) -> None:
        await _task_ended(deps, event)

    @event_subscriber(broker, TaskFailed, durable=f"{lifecycle}-failed", settings=deps.bus)
    async def on_failed(event: TaskFailed) -> None:
        await _task_ended(deps, event)

    @event_subscriber(broker, TaskCancelled, durable=f"{lifecycle}-cancelled", settings=deps.bus)
    async def on_cancelled(event: TaskCancelled) -> None:
        await _task_ended(deps, event)
