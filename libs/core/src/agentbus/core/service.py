"""The frame every agentbus service is built in: broker, health responder, streams
declared before subscribers start, AsyncAPI info, and ``run`` for ``main()``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from opentelemetry.sdk.trace import TracerProvider

from .bus import add_health_responder, create_broker, ensure_streams
from .logging import configure_logging, get_logger
from .settings import CommonSettings
from .tracing import build_tracer_provider

Hook = Callable[[], Awaitable[None]]


@dataclass
class Service:
    """One service process: its name, settings, broker and tracer provider."""

    name: str
    settings: CommonSettings
    broker: NatsBroker
    tracer_provider: TracerProvider
    readiness: list[Callable[[], Awaitable[bool]]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        name: str,
        settings: CommonSettings,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> Service:
        provider = tracer_provider or build_tracer_provider(name, settings.telemetry)
        broker = create_broker(name, settings.bus, tracer_provider=provider)
        service = cls(name, settings, broker, provider)
        add_health_responder(broker, name, service.ready)
        return service

    async def ready(self) -> bool:
        results = [await check() for check in self.readiness]
        return all(results)

    def app(
        self,
        *,
        on_startup: Sequence[Hook] = (),
        on_shutdown: Sequence[Hook] = (),
        after_shutdown: Sequence[Hook] = (),
    ) -> FastStream:
        """The FastStream app: streams first, then the service's own start-up hooks.

        ``on_shutdown`` runs while handlers may still be running; close what handlers
        use (pools, clients) in ``after_shutdown``, which runs once the broker stopped."""

        async def declare_streams() -> None:
            await self.broker.connect()
            await ensure_streams(self.broker.config.connection_state.stream, self.settings.bus)

        async def flush_traces() -> None:
            await asyncio.to_thread(self.tracer_provider.shutdown)

        return FastStream(
            self.broker,
            logger=get_logger(f"agentbus.{self.name}"),
            on_startup=[declare_streams, *on_startup],
            on_shutdown=[*on_shutdown],
            after_shutdown=[*after_shutdown, flush_traces],
            specification=AsyncAPI(
                title=f"agentbus {self.name}",
                version="0.1.0",
                description=f"Messages the agentbus {self.name} service consumes and produces.",
            ),
        )


S = TypeVar("S", bound=CommonSettings)


def run(name: str, settings: S, factory: Callable[[S], FastStream]) -> None:
    """``main()`` of a service: configure logging, build the app, run until signalled."""
    configure_logging(name, settings.log)
    app = factory(settings)
    level = logging.getLevelName(settings.log.level.upper())
    asyncio.run(app.run(log_level=level if isinstance(level, int) else logging.INFO))


def summarize(text: str, limit: int = 400) -> str:
    """Head and tail of a long text with the size noted, for logs and progress events."""
    if len(text) <= limit:
        return text
    half = max(1, (limit - 40) // 2)
    return f"{text[:half]}\n...[{len(text) - 2 * half} chars cut]...\n{text[-half:]}"
