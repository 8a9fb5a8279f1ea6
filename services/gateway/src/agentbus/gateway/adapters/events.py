"""The events stream, read with JetStream directly: a task's ``TaskSubmitted`` by its
subject, and a task's events through an ordered consumer (ephemeral, flow-controlled,
recreated by nats-py from the last sequence if a message goes missing)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from agentbus.contracts import TaskSubmitted, subjects

from ..ports import StoredMessage

_PREFIX_LEN = len(subjects.EVENTS_ROOT) + 1


class StreamEvents:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def submitted(self, task_id: str) -> TaskSubmitted | None:
        subject = subjects.event_subject(task_id, TaskSubmitted.event_type)
        try:
            raw = await self.js.get_last_msg(subjects.EVENTS_STREAM, subject)
        except NotFoundError:
            return None
        try:
            return TaskSubmitted.model_validate_json(raw.data or b"")
        except ValidationError:
            return None

    async def follow(self, task_id: str) -> AsyncIterator[StoredMessage]:
        sub = await self.js.subscribe(
            subjects.task_filter(task_id),
            stream=subjects.EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            async for msg in sub.messages:
                event_type = msg.subject[_PREFIX_LEN:].split(".", 1)[1]
                yield StoredMessage(msg.metadata.sequence.stream, event_type, msg.data)
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone already
                await sub.unsubscribe()
