"""The executor's view of a task's sandbox, in memory: a workspace answering runs,
writes, reads and listings as the sandbox service would (the executor's
``domain.tools.Workspace`` port), and the per-step tools factory over it
(``executor.ports.StepTools``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from agentbus.executor.domain import ExecResult


@dataclass
class MemoryWorkspace:
    """One task's workspace. A run prints ``outputs[code]`` (nothing by default) and
    exits 0, or fails with ``failures[code]`` on stderr and exit code 1. With ``hold``
    set, a run signals ``running`` and then waits for ``hold``; ``stopped`` says it was
    cancelled while waiting. ``late_reply``: a cancelled run still returns, as when its
    reply was in just as the cancellation landed (asyncio then drops the cancellation)."""

    files: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    runs: list[tuple[str, str]] = field(default_factory=list)
    hold: asyncio.Event | None = None
    running: asyncio.Event = field(default_factory=asyncio.Event)
    stopped: bool = False
    late_reply: bool = False

    async def run(self, language: str, code: str, timeout_s: float) -> ExecResult:
        self.runs.append((language, code))
        if self.hold is not None:
            self.running.set()
            try:
                await self.hold.wait()
            except asyncio.CancelledError:
                self.stopped = True
                if not self.late_reply:
                    raise
        if code in self.failures:
            return ExecResult(
                False, f"exit code: 1\noutcome: error\nstderr:\n{self.failures[code]}"
            )
        stdout = self.outputs.get(code, "")
        text = "exit code: 0\noutcome: ok" + (f"\nstdout:\n{stdout}" if stdout else "")
        return ExecResult(True, text)

    async def write_file(self, path: str, content: str) -> ExecResult:
        self.files[path] = content
        return ExecResult(True, f"wrote {len(content.encode())} bytes to {path}")

    async def read_file(self, path: str) -> ExecResult:
        if path not in self.files:
            return ExecResult(False, f"error: no such file: {path}")
        return ExecResult(True, self.files[path])

    async def list_files(self) -> ExecResult:
        if not self.files:
            return ExecResult(True, "the workspace is empty")
        return ExecResult(
            True, "\n".join(f"{p}\t{len(c.encode())} bytes" for p, c in sorted(self.files.items()))
        )

    async def file_names(self) -> list[str]:
        return sorted(self.files)


@dataclass
class NotedMemory:
    """Long-term memory that remembers what was saved and recalls ``recalled``."""

    recalled: list[str] = field(default_factory=list)
    saved: list[tuple[str, str]] = field(default_factory=list)

    async def search(self, query: str, k: int) -> ExecResult:
        return ExecResult(True, "\n".join(self.recalled[:k]) or "nothing found")

    async def save(self, text: str, kind: str) -> ExecResult:
        self.saved.append((text, kind))
        return ExecResult(True, f"saved as mem_{len(self.saved)}")

    async def recall(self, query: str, k: int) -> list[str]:
        return self.recalled[:k]


@dataclass
class MemoryStepTools:
    """The tools factory: one :class:`MemoryWorkspace` per task (shared by its steps, as
    the sandbox keeps one workspace per task), one memory for all."""

    workspaces: dict[str, MemoryWorkspace] = field(default_factory=dict)
    notes: NotedMemory = field(default_factory=NotedMemory)

    def workspace(self, task_id: str, step_id: str) -> MemoryWorkspace:
        return self.workspaces.setdefault(task_id, MemoryWorkspace())

    def memory(self, task_id: str) -> NotedMemory:
        return self.notes
