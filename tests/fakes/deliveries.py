"""JetStream messages of a batch as memory's ``Delivery`` port sees them, recording how
each was settled, and a ``DeadLetterSink`` that keeps what it was given."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from agentbus.contracts import Event
from agentbus.memory.ports import Delivery


@dataclass(eq=False)
class FakeDelivery:
    data: bytes
    subject: str
    stream_seq: int
    timestamp: datetime
    msg_id: str | None = None
    num_delivered: int = 1
    acks: int = 0
    naks: list[float | None] = field(default_factory=list)
    beats: int = 0  # in_progress() calls

    @classmethod
    def of(cls, event: Event, stream_seq: int, *, delivered: int = 1) -> FakeDelivery:
        """``event`` as published (``publish_event`` sets ``Nats-Msg-Id`` to its id)."""
        return cls(
            data=event.model_dump_json().encode(),
            subject=event.subject,
            stream_seq=stream_seq,
            timestamp=event.occurred_at,
            msg_id=event.event_id,
            num_delivered=delivered,
        )

    @property
    def settled(self) -> bool:
        return bool(self.acks or self.naks)

    async def ack(self) -> None:
        self.acks += 1

    async def nak(self, delay: float | None = None) -> None:
        self.naks.append(delay)

    async def in_progress(self) -> None:
        self.beats += 1


@dataclass(frozen=True)
class DeadLetter:
    delivery: Delivery
    error: BaseException
    deliveries: int


class RecordingDeadLetters:
    """Dead letters in order; the backoff doubles from ``backoff_s`` as the real one does."""

    def __init__(self, backoff_s: float = 0.001) -> None:
        self.backoff_s = backoff_s
        self.letters: list[DeadLetter] = []

    async def dead_letter(self, delivery: Delivery, exc: BaseException, delivered: int) -> None:
        self.letters.append(DeadLetter(delivery, exc, delivered))

    def backoff(self, delivered: int) -> float:
        return float(self.backoff_s * (2 ** max(0, delivered - 1)))
