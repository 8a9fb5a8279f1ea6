"""Ports every service's use cases share. A service's own ``ports.py`` re-exports the
ones it uses next to its own, so one file lists everything its use cases need."""

from __future__ import annotations

from typing import Protocol

from agentbus.contracts import Event


class RpcError(Exception):
    """A request/reply call got no usable answer (nobody listening, timeout, bad reply)."""


class Publisher(Protocol):
    """Publishes lifecycle events: durably, de-duplicated by ``event_id``."""

    async def publish(self, event: Event) -> None: ...
