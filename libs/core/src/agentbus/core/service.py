"""The frame every agentbus service is built in: broker, health responder, streams
declared before subscribers start, AsyncAPI info, and ``run`` for ``main()``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import uvicorn
from faststream import FastStream
from faststream.asgi import AsgiFastStream, AsgiResponse, get, make_ping_asgi
from faststream.nats import NatsBroker, NatsRouter
from faststream.specification import AsyncAPI
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Gauge, make_asgi_app

from agentbus.contracts import subjects

from .budget import BudgetLedger
from .bus import add_health_responder, create_broker, ensure_streams, jetstream, publish_event
from .llm import LLMProvider, PriceTable, RateLimitMetrics, build_provider, open_rate_limiter
from .llm.budgeted import BudgetedProvider
from .llm.observe import LLMMetrics, ObservedProvider
from .logging import configure_logging, get_logger
from .settings import CommonSettings, LLMSettings
from .tracing import build_tracer_provider

Hook = Callable[[], Awaitable[None]]


@dataclass
class Service:
    """One service process: its name, settings, broker and tracer provider."""

    name: str
    settings: CommonSettings
    broker: NatsBroker
    tracer_provider: TracerProvider
    metrics: CollectorRegistry
    readiness: list[Callable[[], Awaitable[bool]]] = field(default_factory=list)
    routes: list[NatsRouter] = field(default_factory=list)
    fault: str | None = None
    started: bool = False  # started, routes consuming, not shutting down

    @classmethod
    def create(
        cls,
        name: str,
        settings: CommonSettings,
        *,
        tracer_provider: TracerProvider | None = None,
    ) -> Service:
        provider = tracer_provider or build_tracer_provider(name, settings.telemetry)
        metrics = CollectorRegistry()
        broker = create_broker(name, settings.bus, tracer_provider=provider, metrics=metrics)
        service = cls(name, settings, broker, provider, metrics)
        add_health_responder(broker, name, service.ready, fault=lambda: service.fault)
        return service

    def serve(self, router: NatsRouter) -> None:
        """Subscribe ``router``'s handlers once the start-up hooks have passed. A replica
        whose start-up found a fault (``fail``) subscribes none of them, so it takes no
        event it could not handle: the events wait in their durable consumers."""
        self.routes.append(router)

    def provide(self, key: str, value: object) -> None:
        """Make ``value`` (a service's use cases, built in a start-up hook) what the
        route handlers get as ``Annotated[T, Context(key)]``."""
        self.broker.context.set_global(key, value)

    def fail(self, reason: str) -> None:
        """A start-up check found something a person must fix: the replica stays up, not
        ready, says ``reason`` on /readyz and in its health replies, and serves nothing."""
        self.fault = reason

    def include_routes(self) -> None:
        """Subscribe the routers given to ``serve`` (also for the AsyncAPI document)."""
        for router in self.routes:
            self.broker.include_router(router)

    async def llm_provider(
        self, settings: LLMSettings, role: Literal["planner", "executor"], ledger: BudgetLedger
    ) -> LLMProvider:
        """The LLM as a service uses it: every call of a task reserved from and settled in
        its budget ledger, traced and counted, and every HTTP attempt let through by the
        rate limiter all replicas share (when ``AGENTBUS_LLM_RPM``/``_TPM`` are set).
        Call it once per service (it registers metrics)."""
        limiter = await open_rate_limiter(
            jetstream(self.broker),
            settings,
            metrics=RateLimitMetrics(self.metrics),
        )
        prices = PriceTable.load(settings.prices_file)
        base = build_provider(settings, role, limiter=limiter, prices=prices)
        observed = ObservedProvider(
            base, role=role, tracer_provider=self.tracer_provider, metrics=LLMMetrics(self.metrics)
        )
        return BudgetedProvider(
            observed,
            ledger=ledger,
            prices=prices,
            publish=lambda event: publish_event(self.broker, event),
            role=role,
            default_model=settings.model_for(role) or str(getattr(base, "model", "")),
            reservation_ttl_s=settings.timeout_s * 4 + 60,
        )

    async def ready(self) -> bool:
        """Ready: started without a fault, and every readiness check of the service
        passes (the broker's connection is checked by /readyz itself)."""
        if self.fault is not None or not self.started:
            return False
        for check in self.readiness:
            try:
                if not await check():
                    return False
            except Exception:  # noqa: BLE001 - a check that cannot tell (a closed client): not ready
                return False
        return True

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
            await ensure_streams(jetstream(self.broker), self.settings.bus)

        lag = _ConsumerLag(self, prefix=self.name)

        async def subscribe() -> None:
            if self.fault is None:
                self.include_routes()

        async def mark_started() -> None:  # the broker has started: the routes consume
            self.started = self.fault is None

        async def mark_stopping() -> None:
            self.started = False

        async def flush_traces() -> None:
            await asyncio.to_thread(self.tracer_provider.shutdown)

        app = FastStream(
            self.broker,
            logger=get_logger(f"agentbus.{self.name}"),
            on_startup=[declare_streams, *on_startup, subscribe],
            after_startup=[mark_started, lag.start],
            on_shutdown=[mark_stopping, lag.stop, *on_shutdown],
            after_shutdown=[*after_shutdown, flush_traces],
            specification=AsyncAPI(
                title=f"agentbus {self.name}",
                version="0.1.0",
                description=f"Messages the agentbus {self.name} service consumes and produces.",
            ),
        )
        app.context.set_global("agentbus_service", self)
        return app


S = TypeVar("S", bound=CommonSettings)


def for_docs(app: FastStream) -> FastStream:
    """The app with its routes subscribed without starting it, for the AsyncAPI document
    (``faststream docs gen --factory agentbus.<service>.main:asyncapi_app``)."""
    service: Service = app.context.get("agentbus_service")
    service.include_routes()
    return app


class _ConsumerLag:
    """``agentbus_consumer_pending{durable}``: messages waiting for this service's durable
    consumers (the queue depth an autoscaler reads), refreshed every few seconds."""

    def __init__(self, service: Service, prefix: str, every_s: float = 5.0) -> None:
        self.service = service
        self.prefix = prefix
        self.every_s = every_s
        self.pending = Gauge(
            "agentbus_consumer_pending",
            "Messages not yet delivered to a durable consumer.",
            ("durable",),
            registry=service.metrics,
        )
        self.ack_pending = Gauge(
            "agentbus_consumer_ack_pending",
            "Messages delivered and not yet acknowledged.",
            ("durable",),
            registry=service.metrics,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        js = jetstream(self.service.broker)
        while True:
            with contextlib.suppress(Exception):  # a metric must never take the service down
                consumers = await js.consumers_info(subjects.EVENTS_STREAM)
                for info in consumers:
                    name = info.name or ""
                    if name.startswith(self.prefix):
                        self.pending.labels(name).set(info.num_pending or 0)
                        self.ack_pending.labels(name).set(info.num_ack_pending or 0)
            await asyncio.sleep(self.every_s)


def http_app(service: Service, app: FastStream) -> AsgiFastStream:
    """The app with /metrics, /healthz (broker connected) and /readyz (broker connected
    and the service's own checks: database, Docker engine)."""

    @get(include_in_schema=False)
    async def ready(scope: Any) -> AsgiResponse:
        if service.fault is not None:
            return AsgiResponse(f"not ready: {service.fault}".encode(), 503)
        ok = await service.broker.ping(2.0) and await service.ready()
        return AsgiResponse(b"ready" if ok else b"not ready", 200 if ok else 503)

    return app.as_asgi(
        asgi_routes=[
            ("/metrics", make_asgi_app(service.metrics)),
            ("/healthz", make_ping_asgi(service.broker, timeout=2.0, include_in_schema=False)),
            ("/readyz", ready),
        ]
    )


def run(name: str, settings: S, factory: Callable[[S], FastStream]) -> None:
    """``main()`` of a service: configure logging, build the app, run until signalled.
    With ``AGENTBUS_HTTP_PORT`` set, the app is served over HTTP too (uvicorn)."""
    configure_logging(name, settings.log)
    app = factory(settings)
    level = logging.getLevelName(settings.log.level.upper())
    if not settings.http.port:
        asyncio.run(app.run(log_level=level if isinstance(level, int) else logging.INFO))
        return
    service = app.context.get("agentbus_service")
    config = uvicorn.Config(
        http_app(service, app),
        host=settings.http.host,
        port=settings.http.port,
        log_config=None,  # our structlog set-up handles uvicorn's loggers
        lifespan="on",
    )
    asyncio.run(uvicorn.Server(config).serve())
