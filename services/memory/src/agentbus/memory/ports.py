"""What memory's use cases need from outside, and the errors those parts raise.

The real parts: ``adapters.db.Database`` (the event log and the key store),
``semantic.SemanticMemory``
(the semantic index), ``adapters.deliveries`` (JetStream messages and dead letters).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from agentbus.contracts import KeyInfo, MemorySaveRequest, MemorySearchRequest, StoredEvent

from . import domain

# --- errors the ports raise ----------------------------------------------------------


class DatabaseUnavailable(Exception):
    """The database could not be reached or could not answer; the message says why."""


class EmbeddingError(Exception):
    """The embedding model could not embed; the message says why."""


class TextTooLong(ValueError):
    """A text is longer than the model reads; the message gives its size and the limit."""


class DuplicateKey(ValueError):
    """A key with the same hash is stored already."""


# --- ports ---------------------------------------------------------------------------


class EventLog(Protocol):
    """The event log and the task projections folded from it (Postgres)."""

    async def record_batch(self, items: Sequence[domain.Incoming]) -> list[bool]:
        """Store events in one transaction; per item, whether it was stored now (False:
        already stored). Raises ``DatabaseUnavailable`` for an outage (retry the same
        batch later); any other error means something in the batch is wrong."""
        ...

    async def task_history(
        self, task_id: str, *, tenant: str | None = None
    ) -> tuple[domain.TaskProjection | None, list[StoredEvent]]:
        """A task's projection (None if none yet) and its events in stream order. With a
        tenant, a task of another tenant (or of none) is (None, []), as an unknown one."""
        ...

    async def list_tasks(
        self,
        *,
        status: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        tenant: str | None = None,
    ) -> list[domain.TaskProjection]:
        """Tasks submitted in [since, until), newest first, optionally of one status and
        only of one tenant."""
        ...

    async def costs(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        top_tasks: int,
        tenant: str | None = None,
    ) -> domain.CostReport:
        """LLM spend of the tasks submitted in [since, until), optionally of one tenant."""
        ...

    async def ping(self) -> bool:
        """True when the database answers ``SELECT 1``."""
        ...


class KeyStore(Protocol):
    """The gateway's API keys, by the SHA-256 of each key (Postgres). Raises
    ``DatabaseUnavailable`` when the database cannot answer."""

    async def create_key(self, *, key_id: str, tenant: str, key_hash: str, prefix: str) -> KeyInfo:
        """Store a new key; ``DuplicateKey`` if its hash is stored already."""
        ...

    async def list_keys(self, *, tenant: str | None) -> list[KeyInfo]:
        """Every key (revoked ones too), optionally of one tenant, oldest first."""
        ...

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key; False if it is unknown or revoked already."""
        ...

    async def verify_key(self, key_hash: str) -> KeyInfo | None:
        """The key with this hash if it is not revoked; None otherwise."""
        ...


class SemanticIndex(Protocol):
    """Texts saved and searched by meaning. Refuses a text over its limits
    (``domain.TextTooLarge``, ``TextTooLong``); may raise ``DatabaseUnavailable`` and
    ``EmbeddingError``."""

    async def save(self, request: MemorySaveRequest) -> str:
        """Remember a text; returns its memory id."""
        ...

    async def search(self, request: MemorySearchRequest) -> list[domain.Found]:
        """The memories nearest in meaning to the query, best first."""
        ...


class Delivery(Protocol):
    """One JetStream message of a batch, as the event recorder reads and settles it."""

    @property
    def data(self) -> bytes: ...

    @property
    def subject(self) -> str: ...

    @property
    def stream_seq(self) -> int: ...

    @property
    def timestamp(self) -> datetime:
        """When JetStream stored the message."""
        ...

    @property
    def msg_id(self) -> str | None:
        """Its ``Nats-Msg-Id`` header, if any."""
        ...

    @property
    def num_delivered(self) -> int:
        """How many times it has been delivered, this time included."""
        ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float | None = None) -> None: ...

    async def in_progress(self) -> None:
        """Still working on it: JetStream restarts its ack-wait clock."""
        ...


class DeadLetterSink(Protocol):
    """Where messages that cannot be stored go, and how long a failed one waits."""

    async def dead_letter(self, delivery: Delivery, exc: BaseException, delivered: int) -> None:
        """Publish ``delivery`` with the reason to the service's dead-letter subject."""
        ...

    def backoff(self, delivered: int) -> float:
        """Seconds before a message that failed its ``delivered``-th time is redelivered."""
        ...
