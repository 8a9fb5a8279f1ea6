"""Subject, stream, queue-group and consumer names: the bus layout in one place.

Services never spell a subject as a string literal; they call these helpers.

Lifecycle events live on ``agentbus.tasks.<task_id>.<event type>`` (for example
``agentbus.tasks.tsk_1a2b.step.completed``) in one durable stream, so a client can
follow one task with ``agentbus.tasks.<task_id>.>`` and a service can take one
event type from every task with ``agentbus.tasks.*.<event type>``.
"""

from __future__ import annotations

import re
from typing import Final

EVENTS_STREAM: Final = "AGENTBUS_EVENTS"
EVENTS_ROOT: Final = "agentbus.tasks"
EVENTS_SUBJECTS: Final = f"{EVENTS_ROOT}.>"

DLQ_STREAM: Final = "AGENTBUS_DLQ"
DLQ_ROOT: Final = "agentbus.dlq"
DLQ_SUBJECTS: Final = f"{DLQ_ROOT}.>"

RPC_ROOT: Final = "agentbus.rpc"

SANDBOX_EXEC: Final = f"{RPC_ROOT}.sandbox.exec"
SANDBOX_WRITE_FILE: Final = f"{RPC_ROOT}.sandbox.write_file"
SANDBOX_READ_FILE: Final = f"{RPC_ROOT}.sandbox.read_file"
SANDBOX_LIST_FILES: Final = f"{RPC_ROOT}.sandbox.list_files"
SANDBOX_DESTROY: Final = f"{RPC_ROOT}.sandbox.destroy"

MEMORY_SAVE: Final = f"{RPC_ROOT}.memory.save"
MEMORY_SEARCH: Final = f"{RPC_ROOT}.memory.search"
MEMORY_TASK_HISTORY: Final = f"{RPC_ROOT}.memory.task_history"
MEMORY_TASK_LIST: Final = f"{RPC_ROOT}.memory.task_list"
MEMORY_COSTS: Final = f"{RPC_ROOT}.memory.costs"
MEMORY_KEYS_CREATE: Final = f"{RPC_ROOT}.memory.keys.create"
MEMORY_KEYS_LIST: Final = f"{RPC_ROOT}.memory.keys.list"
MEMORY_KEYS_REVOKE: Final = f"{RPC_ROOT}.memory.keys.revoke"
MEMORY_KEYS_VERIFY: Final = f"{RPC_ROOT}.memory.keys.verify"

# Request/reply handlers of one service share a queue group, so replicas split the load.
SANDBOX_QUEUE: Final = "agentbus-sandbox"
MEMORY_QUEUE: Final = "agentbus-memory"

# Durable consumer names. All replicas of a service bind to the same durable, so
# adding a replica adds capacity and the durable's pending count is its queue depth.
PLANNER_DURABLE_PREFIX: Final = "planner"
EXECUTOR_STEPS_DURABLE: Final = "executor-steps"
MEMORY_EVENTS_DURABLE: Final = "memory-events"
SANDBOX_LIFECYCLE_DURABLE: Final = "sandbox-lifecycle"

# JetStream key-value buckets. Every replica of every service shares them.
PLANNER_STATE_BUCKET: Final = "agentbus_planner_tasks"
PLANNER_TIMERS_BUCKET: Final = "agentbus_planner_timers"  # task -> next deadline
# task -> spend, reservations, limits: the record is ``contracts.ledger.LedgerRecord``
BUDGET_LEDGER_BUCKET: Final = "agentbus_budgets"
RATE_LIMIT_BUCKET: Final = "agentbus_rate_limits"  # provider+key -> request/token windows
STEP_CHECKPOINT_BUCKET: Final = "agentbus_step_checkpoints"  # task.step -> paused dialogue

SERVICES: Final = ("planner", "executor", "sandbox", "memory")

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(value: str, what: str = "task_id") -> str:
    """Raise ValueError unless ``value`` can stand as one NATS subject token."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} must be 1-64 characters of A-Z a-z 0-9 _ -, got {value!r}")
    return value


def event_subject(task_id: str, event_type: str) -> str:
    """The subject one event of one task is published on."""
    return f"{EVENTS_ROOT}.{check_token(task_id)}.{event_type}"


def event_type_filter(event_type: str) -> str:
    """Subject filter for one event type across all tasks."""
    return f"{EVENTS_ROOT}.*.{event_type}"


def task_filter(task_id: str) -> str:
    """Subject filter for every event of one task."""
    return f"{EVENTS_ROOT}.{check_token(task_id)}.>"


def dlq_subject(service: str) -> str:
    """Dead-letter subject of one service."""
    return f"{DLQ_ROOT}.{check_token(service, 'service')}"


def health_subject(service: str) -> str:
    """Request/reply subject every replica of ``service`` answers health pings on."""
    return f"{RPC_ROOT}.{check_token(service, 'service')}.health"


def planner_durable(event_type: str) -> str:
    """Durable consumer name of the planner for one event type."""
    return f"{PLANNER_DURABLE_PREFIX}-{event_type.replace('.', '-')}"
