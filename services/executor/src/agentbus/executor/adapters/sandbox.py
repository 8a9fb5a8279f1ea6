"""The task's workspace, reached through the sandbox service over NATS request/reply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from faststream.nats import NatsBroker
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode, Tracer
from pydantic import BaseModel

from agentbus import contracts
from agentbus.contracts import ExecOutcome, Language, Reply, subjects
from agentbus.core import semconv
from agentbus.core.budget import BudgetLedger, Publish, Spend
from agentbus.core.bus import rpc
from agentbus.core.ports import RpcError

from ..domain import ExecResult

R = TypeVar("R", bound=Reply)


def _unanswered(exc: RpcError) -> ExecResult:
    return ExecResult(False, f"error: the sandbox did not answer: {exc}")


def _failed(reply: Reply) -> ExecResult:
    return ExecResult(False, f"error: {reply.error or 'the sandbox refused the request'}")


def format_exec(reply: contracts.SandboxExecReply) -> ExecResult:
    parts = [f"exit code: {reply.exit_code}", f"outcome: {reply.outcome.value}"]
    if reply.outcome is ExecOutcome.TIMEOUT:
        parts.append("the run was killed at its time limit")
    if reply.stdout:
        parts.append(f"stdout:\n{reply.stdout}")
    if reply.stderr:
        parts.append(f"stderr:\n{reply.stderr}")
    return ExecResult(reply.outcome is ExecOutcome.OK, "\n".join(parts))


@dataclass
class SandboxWorkspace:
    broker: NatsBroker
    task_id: str
    rpc_timeout_s: float = 10.0
    tracer: Tracer = field(default_factory=lambda: trace.get_tracer("agentbus.executor"))
    ledger: BudgetLedger | None = None
    publish: Publish | None = None
    step_id: str = ""
    cpus: float = 1.0

    async def run(self, language: str, code: str, timeout_s: float) -> ExecResult:
        """Run code in the task's sandbox. With a ledger, the run first reserves the most
        CPU it can use (its time limit on every CPU of the sandbox) from the task's
        budget, and settles to what it really used."""
        if self.ledger is None or self.publish is None:
            return (await self._traced_run(language, code, timeout_s))[0]
        async with self.ledger.hold(
            self.task_id,
            Spend(sandbox_cpu=timeout_s * self.cpus),
            publish=self.publish,
            step_id=self.step_id,
            ttl_s=timeout_s + self.rpc_timeout_s + 60,
        ) as hold:
            result, reply = await self._traced_run(language, code, timeout_s)
            hold.actual = Spend(sandbox_cpu=reply.cpu_seconds if reply else 0.0)
        return result

    async def _traced_run(
        self, language: str, code: str, timeout_s: float
    ) -> tuple[ExecResult, contracts.SandboxExecReply | None]:
        with self.tracer.start_as_current_span(
            semconv.SPAN_SANDBOX_EXEC,
            attributes={semconv.TASK_ID: self.task_id, semconv.SANDBOX_LANGUAGE: language},
        ) as span:
            result, reply = await self._run(language, code, timeout_s)
            if reply is not None:
                span.set_attribute(semconv.SANDBOX_OUTCOME, reply.outcome.value)
                if reply.exit_code is not None:
                    span.set_attribute(semconv.SANDBOX_EXIT_CODE, reply.exit_code)
            if not result.ok:
                span.set_status(Status(StatusCode.ERROR))
            return result, reply

    async def _run(
        self, language: str, code: str, timeout_s: float
    ) -> tuple[ExecResult, contracts.SandboxExecReply | None]:
        request = contracts.SandboxExecRequest(
            task_id=self.task_id, language=Language(language), code=code, timeout_s=timeout_s
        )
        try:
            reply = await self._call(
                subjects.SANDBOX_EXEC, request, contracts.SandboxExecReply, timeout_s
            )
        except RpcError as exc:
            return _unanswered(exc), None
        return (format_exec(reply) if reply.ok else _failed(reply)), reply

    async def _call(
        self, subject: str, request: BaseModel, reply_type: type[R], run_s: float = 0.0
    ) -> R:
        """One request to the sandbox service: its bound is the run's time limit, plus
        the time a container may take to start, plus a margin."""
        return await rpc(
            self.broker, subject, request, reply_type, timeout=run_s + self.rpc_timeout_s + 20
        )

    async def _answer(
        self, subject: str, request: BaseModel, reply_type: type[R]
    ) -> R | ExecResult:
        """The sandbox's reply, or what to tell the model when there is none to use."""
        try:
            reply = await self._call(subject, request, reply_type)
        except RpcError as exc:
            return _unanswered(exc)
        return reply if reply.ok else _failed(reply)

    async def write_file(self, path: str, content: str) -> ExecResult:
        request = contracts.SandboxWriteFileRequest(
            task_id=self.task_id, path=path, content=content
        )
        reply = await self._answer(
            subjects.SANDBOX_WRITE_FILE, request, contracts.SandboxWriteFileReply
        )
        if isinstance(reply, ExecResult):
            return reply
        return ExecResult(True, f"wrote {reply.size} bytes to {reply.path}")

    async def read_file(self, path: str) -> ExecResult:
        request = contracts.SandboxReadFileRequest(task_id=self.task_id, path=path)
        reply = await self._answer(
            subjects.SANDBOX_READ_FILE, request, contracts.SandboxReadFileReply
        )
        if isinstance(reply, ExecResult):
            return reply
        note = f"\n[file is {reply.size} bytes; only the start is shown]" if reply.truncated else ""
        return ExecResult(True, reply.content + note)

    async def list_files(self) -> ExecResult:
        request = contracts.SandboxListFilesRequest(task_id=self.task_id)
        reply = await self._answer(
            subjects.SANDBOX_LIST_FILES, request, contracts.SandboxListFilesReply
        )
        if isinstance(reply, ExecResult):
            return reply
        if not reply.files:
            return ExecResult(True, "the workspace is empty")
        listing = "\n".join(f"{f.path}\t{f.size} bytes" for f in reply.files)
        if reply.truncated:
            listing += f"\n[listing cut at {len(reply.files)} files]"
        return ExecResult(True, listing)

    async def file_names(self) -> list[str]:
        request = contracts.SandboxListFilesRequest(task_id=self.task_id)
        reply = await self._call(
            subjects.SANDBOX_LIST_FILES, request, contracts.SandboxListFilesReply
        )
        return [f.path for f in reply.files] if reply.ok else []
