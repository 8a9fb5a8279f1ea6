"""Memory on the bus: one durable batch consumer on every task event (shared by all
replicas) and the request/reply responders (one queue group). Each handler calls one
use case, provided at start-up under its context key."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from faststream import AckPolicy, Context
from faststream.nats import ConsumerConfig, NatsRouter, PullSub
from faststream.nats.message import NatsBatchMessage

from agentbus.contracts import subjects
from agentbus.core.bus import events_stream, request_route

from .adapters.deliveries import deliveries
from .usecases import EventRecorder, KeyQueries, SemanticQueries, TaskQueries

if TYPE_CHECKING:
    from .main import Settings

# The context keys main.py provides the use cases under.
RECORDER = "agentbus_memory_recorder"
TASKS = "agentbus_memory_tasks"
SEMANTIC = "agentbus_memory_semantic"
KEYS = "agentbus_memory_keys"

Recorder = Annotated[EventRecorder, Context(RECORDER)]
BatchMessage = Annotated[NatsBatchMessage, Context("message")]

REQUESTS = (
    (
        subjects.MEMORY_TASK_HISTORY,
        TaskQueries.answer_history,
        TASKS,
        "A task's summary, its steps and its events in stream order.",
    ),
    (
        subjects.MEMORY_TASK_LIST,
        TaskQueries.answer_task_list,
        TASKS,
        "Tasks by status and submission time, newest first.",
    ),
    (
        subjects.MEMORY_COSTS,
        TaskQueries.answer_costs,
        TASKS,
        "LLM spend of the tasks submitted in a time range, by model and by task.",
    ),
    (
        subjects.MEMORY_SAVE,
        SemanticQueries.answer_save,
        SEMANTIC,
        "Remember a text (embedded by the configured model).",
    ),
    (
        subjects.MEMORY_SEARCH,
        SemanticQueries.answer_search,
        SEMANTIC,
        "The memories nearest in meaning to a query, with filters.",
    ),
    (
        subjects.MEMORY_KEYS_CREATE,
        KeyQueries.answer_create,
        KEYS,
        "Store a new API key of a tenant: its SHA-256 and prefix, never the key.",
    ),
    (
        subjects.MEMORY_KEYS_LIST,
        KeyQueries.answer_list,
        KEYS,
        "The API keys (revoked ones too), of one tenant or all, oldest first.",
    ),
    (
        subjects.MEMORY_KEYS_REVOKE,
        KeyQueries.answer_revoke,
        KEYS,
        "Revoke an API key by its id: verify refuses it from then on.",
    ),
    (
        subjects.MEMORY_KEYS_VERIFY,
        KeyQueries.answer_verify,
        KEYS,
        "The key id and tenant of a key's SHA-256, if that key exists and is not revoked.",
    ),
)


def build_router(settings: Settings) -> NatsRouter:
    """Memory's subscribers; their use cases come from the context at each message."""
    router = NatsRouter()
    bus = settings.bus

    @router.subscriber(
        subjects.EVENTS_SUBJECTS,
        stream=events_stream(),
        durable=settings.events_durable,
        pull_sub=PullSub(
            batch_size=settings.event_batch_size, timeout=settings.event_batch_wait_s, batch=True
        ),
        config=ConsumerConfig(
            max_deliver=bus.max_deliver,
            ack_wait=bus.ack_wait_s,
            max_ack_pending=max(1000, 4 * settings.event_batch_size),
        ),
        ack_policy=AckPolicy.MANUAL,
        description="Every lifecycle event of every task (any agentbus.contracts event, "
        "and unknown types kept as they came), stored in the event log and folded into "
        "the task's projection, in batches of up to one transaction each.",
    )
    async def on_events(message: BatchMessage, recorder: Recorder) -> None:
        await recorder.store_events(deliveries(message.raw_message))

    for subject, use_case, uses, description in REQUESTS:
        request_route(
            router,
            subject,
            use_case,
            uses=uses,
            queue=subjects.MEMORY_QUEUE,
            description=description,
        )
    return router
