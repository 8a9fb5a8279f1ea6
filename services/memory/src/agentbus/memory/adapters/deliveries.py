"""JetStream messages as the event recorder's ``Delivery`` port, and dead letters for them.

``DeadLetterPolicy`` (agentbus.core.bus) publishes a nats-py ``Msg``: its stream,
consumer and headers go into the letter, so the sink hands it the message it wraps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg

from agentbus.core.bus import DeadLetterPolicy

from ..ports import Delivery


@dataclass(frozen=True, slots=True)
class JetStreamDelivery:
    """One message of a pulled batch."""

    msg: Msg

    @property
    def data(self) -> bytes:
        return self.msg.data

    @property
    def subject(self) -> str:
        return self.msg.subject

    @property
    def stream_seq(self) -> int:
        return self.msg.metadata.sequence.stream

    @property
    def timestamp(self) -> datetime:
        return self.msg.metadata.timestamp

    @property
    def msg_id(self) -> str | None:
        return (self.msg.headers or {}).get("Nats-Msg-Id")

    @property
    def num_delivered(self) -> int:
        return self.msg.metadata.num_delivered

    async def ack(self) -> None:
        await self.msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self.msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self.msg.in_progress()


def deliveries(messages: Sequence[Msg]) -> list[JetStreamDelivery]:
    """A pulled batch as deliveries, in order."""
    return [JetStreamDelivery(m) for m in messages]


@dataclass(frozen=True, slots=True)
class JetStreamDeadLetters:
    """The ``DeadLetterSink`` port on the service's dead-letter policy."""

    policy: DeadLetterPolicy

    async def dead_letter(self, delivery: Delivery, exc: BaseException, delivered: int) -> None:
        if not isinstance(delivery, JetStreamDelivery):
            raise TypeError(
                f"cannot dead-letter a {type(delivery).__name__}: not a JetStream message"
            )
        await self.policy.dead_letter(delivery.msg, exc, delivered)

    def backoff(self, delivered: int) -> float:
        return self.policy.backoff(delivered)
