"""Fakes shared by the component tests: in-memory stand-ins for the ports, so routes
and use cases run in milliseconds through ``TestNatsBroker``. The integration tests
prove the same paths with the real parts.

* ``kv``: an in-memory JetStream KV bucket the real stores (task state, budget ledger,
  checkpoints) run on;
* ``publisher``: the Publisher port, recording;
* ``scripted_model``: an LLM provider playing a script;
* ``timers``: the planner's deadlines;
* ``sandbox``: the executor's view of a task's workspace and memory;
* ``sandbox_engine``: the sandbox service's engine (no code is run);
* ``event_log``, ``deliveries``: memory's event log, semantic index and JetStream
  deliveries;
* ``gateway``: the gateway's directory (memory) and events stream.
"""

from .deliveries import DeadLetter, FakeDelivery, RecordingDeadLetters
from .event_log import InMemoryEventLog, InMemorySemanticIndex, RejectedRow
from .gateway import DirectoryInMemory, EventsInMemory
from .kv import MemoryKV
from .publisher import RecordingPublisher
from .sandbox import MemoryStepTools, MemoryWorkspace, NotedMemory
from .sandbox_engine import ScriptedSandboxEngine
from .scripted_model import ScriptedModel, finish, tool_turn
from .timers import MemoryTimers

__all__ = [
    "DeadLetter",
    "DirectoryInMemory",
    "EventsInMemory",
    "FakeDelivery",
    "InMemoryEventLog",
    "InMemorySemanticIndex",
    "MemoryKV",
    "MemoryStepTools",
    "MemoryTimers",
    "MemoryWorkspace",
    "NotedMemory",
    "RecordingDeadLetters",
    "RecordingPublisher",
    "RejectedRow",
    "ScriptedModel",
    "ScriptedSandboxEngine",
    "finish",
    "tool_turn",
]
