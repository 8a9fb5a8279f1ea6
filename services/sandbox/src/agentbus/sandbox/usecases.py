"""Sandbox use cases: request/reply for code and files, and container clean-up when a
task ends. Each request goes to the :class:`~.ports.Sandbox` port and is answered; an
expected failure (bad path, engine trouble) becomes ``ok=False`` with the reason, never
a crash and never a caller left waiting. Malformed requests never get here: the bus's
dead-letter middleware (``agentbus.core.bus``) answers them ``ok=False``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from opentelemetry.trace import Tracer

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
)
from agentbus.core import semconv

from .domain import InvalidRequest, SandboxError
from .ports import ExecMetrics, Sandbox

log = structlog.get_logger(__name__)

R = TypeVar("R", bound=Reply)


@dataclass(frozen=True)
class SandboxRequests:
    """What the sandbox service does with each request and each task's end."""

    sandbox: Sandbox
    tracer: Tracer
    metrics: ExecMetrics

    async def ready(self) -> bool:
        """Readiness: the sandbox engine answers."""
        return await self.sandbox.ping()

    async def run_code(self, req: SandboxExecRequest) -> SandboxExecReply:
        attributes = {semconv.TASK_ID: req.task_id, semconv.SANDBOX_LANGUAGE: req.language.value}
        with self.tracer.start_as_current_span(
            semconv.SPAN_SANDBOX_EXEC, attributes=attributes
        ) as span:
            started = time.perf_counter()
            reply = await self._answer(
                req.task_id,
                SandboxExecReply,
                lambda: self.sandbox.run_code(
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
            self.metrics.observe_exec(req.language.value, outcome, time.perf_counter() - started)
            return reply

    async def write_file(self, req: SandboxWriteFileRequest) -> SandboxWriteFileReply:
        return await self._answer(
            req.task_id,
            SandboxWriteFileReply,
            lambda: self.sandbox.write_file(req.task_id, req.path, req.content),
        )

    async def read_file(self, req: SandboxReadFileRequest) -> SandboxReadFileReply:
        return await self._answer(
            req.task_id,
            SandboxReadFileReply,
            lambda: self.sandbox.read_file(req.task_id, req.path, req.max_bytes),
        )

    async def list_files(self, req: SandboxListFilesRequest) -> SandboxListFilesReply:
        return await self._answer(
            req.task_id, SandboxListFilesReply, lambda: self.sandbox.list_files(req.task_id)
        )

    async def destroy(self, req: SandboxDestroyRequest) -> SandboxDestroyReply:
        return await self._answer(req.task_id, SandboxDestroyReply, lambda: self._destroy(req))

    async def task_ended(self, event: Event) -> None:
        """Remove an ended task's container. Engine errors raise, so the event is retried
        with back-off (and dead-lettered after ``max_deliver`` tries)."""
        with structlog.contextvars.bound_contextvars(task_id=event.task_id):
            if await self.sandbox.destroy(event.task_id):
                log.info("removed the sandbox of an ended task", event_type=event.event_type)

    async def _destroy(self, req: SandboxDestroyRequest) -> SandboxDestroyReply:
        return SandboxDestroyReply(destroyed=await self.sandbox.destroy(req.task_id))

    async def _answer(
        self, task_id: str, reply_type: type[R], call: Callable[[], Awaitable[R]]
    ) -> R:
        """Run one request with task_id bound in the logs; expected failures become ok=False."""
        with structlog.contextvars.bound_contextvars(task_id=task_id):
            try:
                return await call()
            except InvalidRequest as exc:
                log.info("refused request", reply=reply_type.__name__, error=str(exc))
                return reply_type(ok=False, error=str(exc))
            except SandboxError as exc:
                log.warning("request failed", reply=reply_type.__name__, error=str(exc))
                return reply_type(ok=False, error=str(exc))
