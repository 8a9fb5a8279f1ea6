"""The Publisher port, recording: what a use case published, in order."""

from __future__ import annotations

from typing import TypeVar

from agentbus.contracts import Event

E = TypeVar("E", bound=Event)


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)

    def of(self, event_type: type[E]) -> list[E]:
        """The published events of one type, in order."""
        return [e for e in self.events if isinstance(e, event_type)]

    def types(self) -> list[str]:
        return [e.event_type for e in self.events]
