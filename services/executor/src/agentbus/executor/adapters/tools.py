"""A step's tools over NATS: the task's workspace in the sandbox service, long-term
memory in the memory service."""

from __future__ import annotations

from dataclasses import dataclass

from faststream.nats import NatsBroker
from opentelemetry.trace import Tracer

from agentbus.core.budget import BudgetLedger
from agentbus.core.ports import Publisher

from .memory import MemoryClient
from .sandbox import SandboxWorkspace


@dataclass(frozen=True)
class BusStepTools:
    """The :class:`~agentbus.executor.ports.StepTools` port: every sandbox run reserves
    its time limit times ``cpus`` CPU-seconds from the task's ``ledger`` and settles to
    what it used, publishing budget events through ``publisher``."""

    broker: NatsBroker
    rpc_timeout_s: float
    tracer: Tracer
    ledger: BudgetLedger
    publisher: Publisher
    cpus: float = 1.0

    def workspace(self, task_id: str, step_id: str) -> SandboxWorkspace:
        return SandboxWorkspace(
            self.broker,
            task_id,
            self.rpc_timeout_s,
            tracer=self.tracer,
            ledger=self.ledger,
            publish=self.publisher.publish,
            step_id=step_id,
            cpus=self.cpus,
        )

    def memory(self, task_id: str) -> MemoryClient:
        return MemoryClient(self.broker, task_id, self.rpc_timeout_s)
