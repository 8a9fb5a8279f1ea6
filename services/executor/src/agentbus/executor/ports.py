"""Ports of the executor: what its use cases need from outside.

The LLM and the publisher are shared ports (``agentbus.core``); the workspace and memory
a step's tools run against are the domain's own Protocols (``domain.tools``), reached per
step through :class:`StepTools`. The real ones: ``service.llm_provider``,
:class:`~agentbus.core.bus.BusPublisher`, :class:`~agentbus.core.budget.BudgetLedger`,
:class:`~agentbus.executor.adapters.checkpoints.CheckpointStore` and
:class:`~agentbus.executor.adapters.tools.BusStepTools` (sandbox and memory over NATS)."""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, Field

from agentbus.core.budget import Ledger
from agentbus.core.llm import LLMProvider, Message
from agentbus.core.ports import Publisher

from .domain.tools import Memory, Workspace

__all__ = [
    "Checkpoints",
    "LLMProvider",
    "LedgerReader",
    "Memory",
    "Publisher",
    "StepCheckpoint",
    "StepTools",
    "Workspace",
]


class StepCheckpoint(BaseModel):
    conversation: str = Field(description="The dialogue's key (replay and traces use it).")
    messages: list[Message] = Field(description="The dialogue up to the refused call.")
    touched_workspace: bool = False


class Checkpoints(Protocol):
    """A paused step's dialogue, kept so the step resumes where it stopped, on any
    replica, after any restart."""

    async def load(self, task_id: str, step_id: str) -> StepCheckpoint | None: ...

    async def save(self, task_id: str, step_id: str, checkpoint: StepCheckpoint) -> None: ...

    async def drop(self, task_id: str, step_id: str) -> None: ...


class LedgerReader(Protocol):
    """The task budget ledgers, read only: whether a task has ended (``CLOSED``)."""

    async def load(self, task_id: str) -> Ledger | None: ...


class StepTools(Protocol):
    """What one step's tools run against: the task's workspace (in its sandbox) and
    long-term memory."""

    def workspace(self, task_id: str, step_id: str) -> Workspace:
        """The task's workspace, as this step uses it (its sandbox runs are charged to
        the task's budget under ``step_id``)."""
        ...

    def memory(self, task_id: str) -> Memory:
        """Long-term memory, saving on behalf of ``task_id``."""
        ...
