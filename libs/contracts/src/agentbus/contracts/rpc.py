"""Request/reply messages (core NATS request/reply with queue groups).

Every reply has ``ok`` and ``error``: a handler that cannot serve a request says
why in ``error`` instead of leaving the caller to time out.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, field_validator

from .lifecycle import SHOWN_STATUSES, StepStatus, TaskStatus
from .models import Contract, ModelUsage, Usage

TaskIdField = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The task this is about.")


class Reply(Contract):
    ok: bool = Field(True, description="False when the request could not be served.")
    error: str | None = Field(None, description="Why it could not be served, for a person.")


# --- sandbox -------------------------------------------------------------------------


class Language(StrEnum):
    PYTHON = "python"
    BASH = "bash"


class ExecOutcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    OOM_KILLED = "oom_killed"
    OUTPUT_TRUNCATED = "output_truncated"


class SandboxExecRequest(Contract):
    task_id: str = TaskIdField
    language: Language = Field(Language.PYTHON, description="Interpreter to run the code with.")
    code: str = Field(max_length=100_000, description="Source code to run.")
    stdin: str | None = Field(None, max_length=1_000_000, description="Standard input, if any.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    timeout_s: float = Field(30, gt=0, le=3600, description="Wall-clock limit of this run.")


class SandboxExecReply(Reply):
    exit_code: int | None = Field(None, description="Process exit code; None if it never ran.")
    stdout: str = Field("", description="Standard output (capped).")
    stderr: str = Field("", description="Standard error (capped).")
    duration_ms: float = Field(0, ge=0, description="Wall time of the run.")
    outcome: ExecOutcome = Field(ExecOutcome.ERROR, description="Typed result of the run.")
    cpu_seconds: float = Field(0, ge=0, description="CPU time (user + system) the run used.")


class SandboxWriteFileRequest(Contract):
    task_id: str = TaskIdField
    path: str = Field(min_length=1, max_length=1024, description="Path inside the workspace.")
    content: str = Field(
        max_length=900_000, description="File content (text); NATS carries at most 1 MB."
    )


class SandboxWriteFileReply(Reply):
    path: str = Field("", description="Path written, relative to the workspace.")
    size: int = Field(0, ge=0, description="Bytes written.")


class SandboxReadFileRequest(Contract):
    task_id: str = TaskIdField
    path: str = Field(min_length=1, max_length=1024, description="Path inside the workspace.")
    max_bytes: int = Field(
        512 * 1024, gt=0, description="Most bytes to return (the service caps it at 512 KiB)."
    )


class SandboxReadFileReply(Reply):
    path: str = Field("", description="Path read, relative to the workspace.")
    content: str = Field("", description="File content, decoded as UTF-8 with replacement.")
    size: int = Field(0, ge=0, description="Full size of the file in bytes.")
    truncated: bool = Field(False, description="True if only the first max_bytes are returned.")


class SandboxListFilesRequest(Contract):
    task_id: str = TaskIdField


class FileInfo(Contract):
    path: str = Field(description="Path relative to the workspace.")
    size: int = Field(ge=0, description="Size in bytes.")


class SandboxListFilesReply(Reply):
    files: list[FileInfo] = Field(default_factory=list, description="Files in the workspace.")
    truncated: bool = Field(False, description="True if the listing was cut at its limit.")


class SandboxDestroyRequest(Contract):
    task_id: str = TaskIdField


class SandboxDestroyReply(Reply):
    destroyed: bool = Field(False, description="True if a container was removed.")


# --- memory --------------------------------------------------------------------------


class MemorySaveRequest(Contract):
    text: str = Field(min_length=1, max_length=20_000, description="What to remember.")
    kind: str = Field("fact", max_length=64, description="Kind of memory, e.g. fact, result.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Free-form tags.")
    task_id: str | None = Field(None, description="Task the memory came from, if any.")
    source: str = Field("agent", max_length=200, description="Who saved it.")


class MemorySaveReply(Reply):
    memory_id: str | None = Field(None, description="Id of the stored memory.")


class MemorySearchRequest(Contract):
    query: str = Field(min_length=1, max_length=20_000, description="What to look for.")
    k: int = Field(5, ge=1, le=100, description="Most results to return.")
    kind: str | None = Field(None, description="Only memories of this kind.")
    task_id: str | None = Field(None, description="Only memories of this task.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Only memories whose metadata contains these pairs."
    )
    min_score: float = Field(0.0, ge=-1, le=1, description="Least cosine similarity.")


class MemoryHit(Contract):
    memory_id: str = Field(description="Id of the memory.")
    text: str = Field(description="The remembered text.")
    kind: str = Field(description="Kind of memory.")
    score: float = Field(description="Cosine similarity to the query, -1..1.")
    task_id: str | None = Field(None, description="Task it came from.")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Its tags.")


class MemorySearchReply(Reply):
    hits: list[MemoryHit] = Field(default_factory=list, description="Best matches first.")


class TaskSummary(Contract):
    task_id: str = Field(description="Task id.")
    goal: str = Field("", description="The task in plain words.")
    status: TaskStatus = Field(description="Where the task stands.")
    answer: str | None = Field(None, description="Final answer, once completed.")
    error: str | None = Field(None, description="Failure reason, once failed.")
    usage: Usage = Field(default_factory=Usage, description="LLM spend so far.")
    created_at: datetime = Field(description="When the task was submitted.")
    updated_at: datetime = Field(description="When the task last changed.")


class StoredEvent(Contract):
    seq: int = Field(description="Position in the task's history (stream sequence).")
    event_id: str = Field(description="The event's id.")
    type: str = Field(description="The event's type, e.g. step.completed.")
    occurred_at: datetime = Field(description="When it happened.")
    payload: dict[str, Any] = Field(description="The event as published.")


TenantField = Field(
    None,
    pattern=r"^[A-Za-z0-9_-]{1,64}$",
    description="Only this tenant's tasks (the gateway always sets it); None: every task.",
)


class TaskHistoryRequest(Contract):
    task_id: str = TaskIdField
    tenant: str | None = TenantField


class StepSummary(Contract):
    id: str = Field(description="Step id within the plan.")
    title: str = Field("", description="Short title of the step.")
    status: StepStatus = Field(description="Where the step stands.")
    attempt: int = Field(0, ge=0, description="Latest attempt seen (0: not started).")
    output: str | None = Field(None, description="Output of the step, once completed.")
    error: str | None = Field(None, description="Why the latest attempt failed, if it did.")
    usage: Usage = Field(
        default_factory=Usage, description="LLM spend of the step, all attempts together."
    )


class TaskHistoryReply(Reply):
    task: TaskSummary | None = Field(None, description="The task, or None if unknown.")
    events: list[StoredEvent] = Field(default_factory=list, description="Events in order.")
    steps: list[StepSummary] = Field(
        default_factory=list, description="Steps of the current plan and where each stands."
    )


class TaskListRequest(Contract):
    tenant: str | None = TenantField
    status: TaskStatus | None = Field(None, description="Only tasks in this status.")
    since: datetime | None = Field(None, description="Only tasks submitted at or after this.")
    until: datetime | None = Field(None, description="Only tasks submitted before this.")
    limit: int = Field(50, ge=1, le=1000, description="Most tasks to return, newest first.")

    @field_validator("status")
    @classmethod
    def _shown(cls, status: TaskStatus | None) -> TaskStatus | None:
        if status is not None and status not in SHOWN_STATUSES:
            shown = ", ".join(s.value for s in TaskStatus if s in SHOWN_STATUSES)
            raise ValueError(f"no task is listed as {status.value!r}; one of: {shown}")
        return status


class TaskListReply(Reply):
    tasks: list[TaskSummary] = Field(default_factory=list, description="Newest first.")


class CostsRequest(Contract):
    tenant: str | None = TenantField
    since: datetime | None = Field(None, description="Tasks submitted at or after this.")
    until: datetime | None = Field(None, description="Tasks submitted before this.")
    top_tasks: int = Field(20, ge=0, le=1000, description="Most expensive tasks to list.")


class TaskCost(Contract):
    task_id: str = Field(description="Task id.")
    goal: str = Field("", description="The task in plain words.")
    status: TaskStatus = Field(description="Where the task stands.")
    created_at: datetime = Field(description="When the task was submitted.")
    usage: Usage = Field(default_factory=Usage, description="The task's LLM spend by model.")


class CostsReply(Reply):
    tasks: int = Field(0, ge=0, description="Tasks submitted in the range.")
    total: ModelUsage = Field(default_factory=ModelUsage, description="Spend of all of them.")
    by_model: dict[str, ModelUsage] = Field(
        default_factory=dict, description="Spend per model over the range."
    )
    by_task: list[TaskCost] = Field(
        default_factory=list, description="The most expensive tasks, costliest first."
    )


# --- health --------------------------------------------------------------------------


class HealthRequest(Contract):
    pass


class HealthReply(Reply):
    service: str = Field("", description="Service name.")
    instance: str = Field("", description="Replica id (host and pid).")
    status: Literal["ok", "degraded"] = Field("ok", description="Readiness of the replica.")


# --- tenants and API keys (kept by memory; the key itself never crosses the bus) ------


def hash_api_key(key: str) -> str:
    """The SHA-256 of an API key, hex: what memory stores and is asked about."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyInfo(Contract):
    key_id: str = Field(description="The key's id (not secret).")
    tenant: str = Field(description="The tenant the key acts for.")
    prefix: str = Field(description="The key's first characters, to recognise it.")
    created_at: datetime = Field(description="When the key was created.")
    revoked_at: datetime | None = Field(None, description="When it was revoked, if it was.")


class KeyCreateRequest(Contract):
    tenant: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Tenant (created if new).")
    key_hash: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex: the key is never sent."
    )
    prefix: str = Field(max_length=16, description="The key's first characters.")


class KeyCreateReply(Reply):
    key: KeyInfo | None = Field(None, description="The stored key.")


class KeyListRequest(Contract):
    tenant: str | None = TenantField


class KeyListReply(Reply):
    keys: list[KeyInfo] = Field(default_factory=list, description="Oldest first.")


class KeyRevokeRequest(Contract):
    key_id: str = Field(max_length=64, description="The key to revoke.")


class KeyRevokeReply(Reply):
    revoked: bool = Field(False, description="False if it was unknown or revoked already.")


class KeyVerifyRequest(Contract):
    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, hex.")


class KeyVerifyReply(Reply):
    """ok=False for an unknown or revoked key (``refused``), or when memory cannot check."""

    refused: bool = Field(
        False, description="True: the key is unknown or revoked (not: memory could not check)."
    )
    key_id: str = Field("", description="The key's id.")
    tenant: str = Field("", description="The tenant it acts for.")
