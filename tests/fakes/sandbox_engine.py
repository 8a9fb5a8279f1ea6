"""The sandbox service's ``Sandbox`` port in memory: no container, no code ever runs.

Runs return scripted :class:`SandboxExecReply` results (or raise scripted errors);
files live in a dict per task, under the same path rules as the real sandbox
(``domain.workspace_path``), so a bad path is refused with the real reason. Every call
records the task as having a sandbox until ``destroy`` removes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agentbus.contracts import (
    ExecOutcome,
    FileInfo,
    Language,
    SandboxExecReply,
    SandboxListFilesReply,
    SandboxReadFileReply,
    SandboxWriteFileReply,
)
from agentbus.sandbox import domain
from agentbus.sandbox.domain import SandboxError


@dataclass(frozen=True)
class Run:
    """One ``run_code`` call as the port received it."""

    task_id: str
    language: Language
    code: str
    timeout_s: float | None
    env: dict[str, str]
    stdin: str | None


@dataclass
class ScriptedSandboxEngine:
    """``script``: what the next runs return (a reply) or raise (an exception), in
    order; once empty, a run succeeds with empty output. ``broken``: every call raises
    it and ``ping`` is False, as when the engine is down."""

    script: list[SandboxExecReply | Exception] = field(default_factory=list)
    broken: SandboxError | None = None
    runs: list[Run] = field(default_factory=list)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    live: set[str] = field(default_factory=set)
    destroyed: list[str] = field(default_factory=list)

    def _use(self, task_id: str) -> dict[str, str]:
        if self.broken is not None:
            raise self.broken
        self.live.add(task_id)
        return self.files.setdefault(task_id, {})

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
        self._use(task_id)
        self.runs.append(Run(task_id, language, code, timeout_s, dict(env), stdin))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        return step or SandboxExecReply(exit_code=0, outcome=ExecOutcome.OK)

    async def write_file(self, task_id: str, path: str, content: str) -> SandboxWriteFileReply:
        relative = domain.workspace_path(path)
        self._use(task_id)[relative] = content
        return SandboxWriteFileReply(path=relative, size=len(content.encode()))

    async def read_file(self, task_id: str, path: str, max_bytes: int) -> SandboxReadFileReply:
        relative = domain.workspace_path(path)
        files = self._use(task_id)
        if relative not in files:
            raise SandboxError(f"could not read {relative}: No such file or directory")
        data = files[relative].encode()
        return SandboxReadFileReply(
            path=relative,
            content=data[:max_bytes].decode(errors="replace"),
            size=len(data),
            truncated=len(data) > max_bytes,
        )

    async def list_files(self, task_id: str) -> SandboxListFilesReply:
        files = self._use(task_id)
        return SandboxListFilesReply(
            files=[FileInfo(path=p, size=len(c.encode())) for p, c in sorted(files.items())]
        )

    async def destroy(self, task_id: str) -> bool:
        if self.broken is not None:
            raise self.broken
        self.destroyed.append(task_id)
        if task_id not in self.live:
            return False
        self.live.discard(task_id)  # the workspace (self.files) stays, as on the host
        return True

    async def ping(self) -> bool:
        return self.broken is None
