"""Ports of the sandbox service: what its use cases need from outside.

:class:`Sandbox` is the port apart from its implementation, as autogen-core keeps its
``CodeExecutor`` apart from the Docker executor: the real one is
:class:`~agentbus.sandbox.adapters.docker.DockerSandbox`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from agentbus.contracts import (
    Language,
    SandboxExecReply,
    SandboxListFilesReply,
    SandboxReadFileReply,
    SandboxWriteFileReply,
)


class Sandbox(Protocol):
    """One locked-down sandbox per task, created on the task's first call.

    Expected failures raise :class:`~agentbus.sandbox.domain.InvalidRequest` (the
    request can never be served as asked) or
    :class:`~agentbus.sandbox.domain.SandboxError` (engine trouble)."""

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
        """Run code under the limits; the reply's typed outcome says how it ended."""
        ...

    async def write_file(self, task_id: str, path: str, content: str) -> SandboxWriteFileReply:
        """Write a file in the task's workspace (parents created)."""
        ...

    async def read_file(self, task_id: str, path: str, max_bytes: int) -> SandboxReadFileReply:
        """Read up to ``max_bytes`` of a file in the task's workspace."""
        ...

    async def list_files(self, task_id: str) -> SandboxListFilesReply:
        """The regular files of the task's workspace with their sizes."""
        ...

    async def destroy(self, task_id: str) -> bool:
        """Remove the task's container (its workspace stays); whether one was removed."""
        ...

    async def ping(self) -> bool:
        """Readiness: the engine answers."""
        ...


class ExecMetrics(Protocol):
    """Where code runs are counted (the real one: Prometheus, ``adapters.metrics``)."""

    def observe_exec(self, language: str, outcome: str, seconds: float) -> None:
        """One run of ``language`` that ended with ``outcome`` ("refused": not run)."""
        ...
