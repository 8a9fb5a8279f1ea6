"""What the planner's use cases need from outside, as Protocols. The real adapters:
``adapters.state.TaskStore`` and ``adapters.timers.TimerStore`` (JetStream KV),
``agentbus.core.budget.BudgetLedger`` (KV), the service's budgeted LLM provider and
``agentbus.core.bus.BusPublisher``. The component tests run the use cases on fakes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from agentbus.contracts import BudgetKind
from agentbus.core.budget import Ledger, Spend
from agentbus.core.llm import LLMProvider
from agentbus.core.ports import Publisher

from .domain import TaskState

__all__ = ["LLMProvider", "LedgerPort", "Publisher", "TaskStates", "Timers"]

Mutation = Callable[[TaskState | None], TaskState | None]


class TaskStates(Protocol):
    """Every task's planner state, changed only by compare-and-set."""

    async def mutate(self, task_id: str, change: Mutation) -> TaskState | None:
        """Apply ``change`` to the current state and save it (retrying on conflict);
        ``change`` returns None to leave it. Returns the state as it now is."""
        ...


class Timers(Protocol):
    """When each live task must be looked at again if no event comes."""

    async def set(self, task_id: str, at: datetime | None) -> None: ...

    async def due(self, now: datetime) -> list[str]: ...


class LedgerPort(Protocol):
    """The task budget ledgers the planner opens, pauses, extends and closes."""

    async def load(self, task_id: str) -> Ledger | None: ...

    async def create(self, ledger: Ledger) -> Ledger: ...

    async def approve(self, task_id: str, approval_id: str, add: Spend) -> Ledger | None: ...

    async def pause(
        self, task_id: str, kind: BudgetKind, used: float, limit: float, reason: str
    ) -> tuple[bool, Ledger | None]: ...

    async def close(self, task_id: str, reason: str) -> None: ...
