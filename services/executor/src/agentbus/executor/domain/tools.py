"""The executor's tools: argument models (their JSON schemas are what the LLM sees) and
the workspace interface the tools run against."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from agentbus.core.llm import ToolSpec


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunPython(ToolArgs):
    """Run Python 3 code in the task's sandbox. The working directory is the task's
    workspace; files persist between steps. There is no network. Print what you need."""

    code: str = Field(description="Python source to run.")
    timeout_s: float = Field(60, gt=0, le=600, description="Wall-clock limit in seconds.")


class RunShell(ToolArgs):
    """Run a bash command in the task's sandbox (workspace as working directory, no network)."""

    command: str = Field(description="The bash command line.")
    timeout_s: float = Field(60, gt=0, le=600, description="Wall-clock limit in seconds.")


class WriteFile(ToolArgs):
    """Write a text file in the task's workspace (parent directories are created). Use it
    for long programs too, then run them with run_shell (python3 prog.py)."""

    path: str = Field(description="Path relative to the workspace, e.g. out/result.txt.")
    content: str = Field(description="The full text content.")


class ReadFile(ToolArgs):
    """Read a text file from the task's workspace."""

    path: str = Field(description="Path relative to the workspace.")


class ListFiles(ToolArgs):
    """List the files in the task's workspace with their sizes."""


class SearchMemory(ToolArgs):
    """Search long-term memory (facts and results saved by earlier steps and tasks)."""

    query: str = Field(description="What to look for, in words.")
    k: int = Field(5, ge=1, le=20, description="Most results.")


class SaveMemory(ToolArgs):
    """Save a fact worth remembering for later steps and future tasks."""

    text: str = Field(description="The fact, self-contained.")
    kind: str = Field("fact", description="Kind of memory, e.g. fact, preference, result.")


class FinishStep(ToolArgs):
    """Finish this step. Call it once the step's work is done, or with success=false when
    it cannot be done (the planner then re-plans with your reason)."""

    result: str = Field(
        description="What the step produced (values, findings, file names), or why it failed."
    )
    success: bool = Field(True, description="False if the step could not be done.")


TOOLS: dict[str, type[ToolArgs]] = {
    "run_python": RunPython,
    "run_shell": RunShell,
    "write_file": WriteFile,
    "read_file": ReadFile,
    "list_files": ListFiles,
    "search_memory": SearchMemory,
    "save_memory": SaveMemory,
    "finish_step": FinishStep,
}


@functools.cache
def _specs() -> tuple[ToolSpec, ...]:
    specs = []
    for name, model in TOOLS.items():
        schema = model.model_json_schema()
        schema.pop("title", None)
        description = " ".join((model.__doc__ or name).split())
        schema.pop("description", None)
        specs.append(ToolSpec(name=name, description=description, parameters=schema))
    return tuple(specs)


def tool_specs() -> list[ToolSpec]:
    """The tools' specs for the model (built once: JSON schemas are costly to make)."""
    return list(_specs())


@dataclass(frozen=True)
class ExecResult:
    ok: bool
    text: str


class Workspace(Protocol):
    """What the tools need from the sandbox; the adapter implements it over NATS."""

    async def run(self, language: str, code: str, timeout_s: float) -> ExecResult: ...

    async def write_file(self, path: str, content: str) -> ExecResult: ...

    async def read_file(self, path: str) -> ExecResult: ...

    async def list_files(self) -> ExecResult: ...

    async def file_names(self) -> list[str]: ...


class Memory(Protocol):
    """Long-term memory; the adapter reaches the memory service over NATS."""

    async def search(self, query: str, k: int) -> ExecResult: ...

    async def save(self, text: str, kind: str) -> ExecResult: ...

    async def recall(self, query: str, k: int) -> list[str]:
        """Memories for the step's prompt; empty when memory cannot answer."""
        ...
