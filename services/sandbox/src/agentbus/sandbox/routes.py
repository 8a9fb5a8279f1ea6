"""Sandbox routes: five request/reply subjects served by a queue group, and one durable
per terminal task event that removes the task's container. Each calls one
:class:`~.usecases.SandboxRequests` method, which the start-up hook provides as
``USES`` once the Docker sandbox is open."""

from __future__ import annotations

from faststream.nats import NatsRouter

from agentbus.contracts import TaskCancelled, TaskCompleted, TaskFailed, subjects
from agentbus.core.bus import event_route, request_route
from agentbus.core.settings import BusSettings

from .usecases import SandboxRequests

USES = "agentbus_sandbox"  # the context key main.py provides the SandboxRequests under

REQUESTS = (
    (subjects.SANDBOX_EXEC, SandboxRequests.run_code),
    (subjects.SANDBOX_WRITE_FILE, SandboxRequests.write_file),
    (subjects.SANDBOX_READ_FILE, SandboxRequests.read_file),
    (subjects.SANDBOX_LIST_FILES, SandboxRequests.list_files),
    (subjects.SANDBOX_DESTROY, SandboxRequests.destroy),
)

# A task's end removes its container: one durable per terminal event type, each
# shared by all replicas (sandbox-lifecycle-completed, -failed, -cancelled).
TASK_ENDS = (TaskCompleted, TaskFailed, TaskCancelled)


def build_router(bus: BusSettings, *, concurrency: int = 8) -> NatsRouter:
    """The sandbox's subscribers; ``concurrency``: requests of each kind served at once."""
    router = NatsRouter()
    for subject, use_case in REQUESTS:
        request_route(
            router,
            subject,
            use_case,
            uses=USES,
            queue=subjects.SANDBOX_QUEUE,
            max_workers=concurrency,
        )
    for event_type in TASK_ENDS:
        ending = event_type.event_type.removeprefix("task.")
        event_route(
            router,
            event_type,
            SandboxRequests.task_ended,
            uses=USES,
            durable=f"{subjects.SANDBOX_LIFECYCLE_DURABLE}-{ending}",
            settings=bus,
        )
    return router
