"""Gateway entry point: ``python -m agentbus.gateway`` or ``agentbus-gateway``.

A FastAPI app wrapped by FastStream's FastAPI integration (``faststream_fastapi``), so
its NATS side is the same broker (tracing, metrics, dead letters, health responder) as
every other service's. Stateless: run as many replicas as you like behind any load
balancer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from faststream_fastapi import FastStreamAPI
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import make_asgi_app
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentbus.contracts import Problem, ProblemField
from agentbus.core.bus import BusPublisher, ensure_streams, jetstream
from agentbus.core.logging import configure_logging
from agentbus.core.service import Service
from agentbus.core.settings import CommonSettings

from .adapters.directory import BusDirectory
from .adapters.events import StreamEvents
from .domain import KeyCache, ProblemError
from .routes import build_api
from .usecases import Gateway

_PROBLEM_JSON = "application/problem+json"


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_GATEWAY_", extra="ignore")

    port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the HTTP API (its /metrics, /healthz, /readyz too). Unset: "
        "AGENTBUS_HTTP_PORT, as every service's HTTP endpoint, or 8080 when that is 0.",
    )

    def listen_port(self) -> int:
        return self.port or self.http.port or 8080

    max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest request body; a larger one gets a 413."
    )
    key_cache_s: float = Field(
        30.0,
        ge=0,
        description="How long a verified API key is trusted without asking memory again "
        "(a revoked key stops working within this time).",
    )


def _problem(status: int, title: str, detail: str, errors: list[ProblemField]) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail, errors=errors)
    return JSONResponse(body.model_dump(mode="json"), status_code=status, media_type=_PROBLEM_JSON)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with a 413 problem: at once when its
    Content-Length says so, else as soon as that many bytes have come in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        seen = 0
        over = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                over = True
                raise _TooLarge
            return message

        async def unless_over(message: Message) -> None:
            if not over:  # once over, the app's own answer (a parse error) is dropped
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted, unless_over)
        if over:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the limit is {self.limit} bytes"
        await _problem(413, "Request body too large", detail, [])(scope, receive, send)


def problem_handlers(app: FastAPI) -> None:
    """Every error as RFC 9457 problem details; bad input names the wrong fields."""

    @app.exception_handler(ProblemError)
    async def problem(_: Request, exc: ProblemError) -> JSONResponse:
        return _problem(exc.status, exc.title, exc.detail, exc.errors)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            ProblemField(field=".".join(str(p) for p in e.get("loc", ())), message=e.get("msg", ""))
            for e in exc.errors()
        ]
        return _problem(422, "Invalid request", "the request does not match the API", errors)

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), "", [])


def api_app(
    *, max_body_bytes: int, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None
) -> FastAPI:
    """The HTTP API: ``/v1`` routes and problem details; ``app.state.gateway`` holds the
    use cases (set by the lifespan; the component tests set it to one on fakes)."""
    app = FastAPI(
        title="agentbus",
        version="0.1.0",
        description="Submit tasks, follow their events live, approve and cancel them.",
        lifespan=lifespan,
    )
    problem_handlers(app)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.include_router(build_api())
    return app


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStreamAPI:
    service = Service.create("gateway", settings, tracer_provider=tracer_provider)
    broker = service.broker

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        js = jetstream(broker)
        await ensure_streams(js, settings.bus)
        gateway = Gateway(
            directory=BusDirectory(broker, settings.bus.rpc_timeout_s),
            events=StreamEvents(js),
            publisher=BusPublisher(broker),
            keys=KeyCache(settings.key_cache_s),
        )
        app.state.gateway = gateway  # what the routes use (routes._gateway)
        service.started = True
        try:
            yield
        finally:
            service.started = False
            await asyncio.to_thread(service.tracer_provider.shutdown)

    app = api_app(max_body_bytes=settings.max_body_bytes, lifespan=lifespan)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        ok = await broker.ping(2.0)
        return PlainTextResponse("ok" if ok else "no bus", status_code=200 if ok else 503)

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> PlainTextResponse:
        ok = await broker.ping(2.0) and await service.ready()
        return PlainTextResponse("ready" if ok else "not ready", status_code=200 if ok else 503)

    app.mount("/metrics", make_asgi_app(service.metrics))
    return FastStreamAPI(broker, application=app, safe_connection=True)


def main() -> None:
    settings = Settings()
    configure_logging("gateway", settings.log)
    level = logging.getLevelName(settings.log.level.upper())
    config = uvicorn.Config(
        create_app(settings),
        host=settings.http.host,  # AGENTBUS_HTTP_HOST, as every service
        port=settings.listen_port(),
        log_config=None,  # our structlog set-up handles uvicorn's loggers
        log_level=level if isinstance(level, int) else logging.INFO,
        lifespan="on",
    )
    asyncio.run(uvicorn.Server(config).serve())
