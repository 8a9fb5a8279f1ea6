"""The bus: broker factory, stream layout, event publishing, dead-lettering, RPC.

Delivery rules (ARCHITECTURE.md, "The bus"):

* lifecycle events go to the ``AGENTBUS_EVENTS`` stream with ``Nats-Msg-Id`` = event_id,
  so JetStream drops duplicates inside its window;
* each service reads them through durable pull consumers shared by all its replicas;
* a handler error nacks the event with a growing delay (``AckPolicy.NACK_ON_ERROR``,
  not FastStream's default, which terminates the message on the first error); after
  ``max_deliver`` attempts, or at once for input that can never be handled, the event
  goes to ``agentbus.dlq.<service>`` with the reason and is acked;
* request/reply goes over core NATS with queue groups and explicit timeouts; a request
  that cannot be handled gets an error reply instead of silence.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import socket
import typing
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import nats.errors
import structlog
from faststream import AckPolicy, Context
from faststream.exceptions import NackMessage
from faststream.middlewares import BaseMiddleware
from faststream.nats import ConsumerConfig, JStream, NatsBroker, NatsMessage, NatsRouter, PullSub
from faststream.nats.opentelemetry import NatsTelemetryMiddleware
from faststream.nats.prometheus import NatsPrometheusMiddleware
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from agentbus.contracts import (
    Event,
    HealthReply,
    HealthRequest,
    Reply,
    describe_validation,
    subjects,
    utcnow,
)

from . import semconv
from ._nats_fixes import apply_nats_fixes
from .ports import RpcError
from .progress import keep_in_progress
from .settings import BusSettings

if TYPE_CHECKING:
    from faststream import ContextRepo
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import PubAck
    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

log = structlog.get_logger(__name__)


R = TypeVar("R", bound=Reply)

_STRIP_HEADER_PREFIX = "Nats-"
_MAX_DLQ_PAYLOAD = 512 * 1024


class PoisonMessage(Exception):
    """Raised by a handler for input that can never be handled: dead-letter it at once."""


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- streams ---------------------------------------------------------------------------


def stream_configs(settings: BusSettings) -> list[StreamConfig]:
    """Both streams: on file, kept ``events_max_age_days``, de-duplicated by message id."""
    kept = StreamConfig(
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=settings.events_max_age_days * 24 * 3600.0,
        duplicate_window=settings.duplicate_window_s,
    )
    return [
        dataclasses.replace(
            kept,
            name=subjects.EVENTS_STREAM,
            description="agentbus task lifecycle events",
            subjects=[subjects.EVENTS_SUBJECTS],
            discard=DiscardPolicy.OLD,
        ),
        dataclasses.replace(
            kept,
            name=subjects.DLQ_STREAM,
            description="agentbus dead letters: events no handler could process, with reasons",
            subjects=[subjects.DLQ_SUBJECTS],
        ),
    ]


async def ensure_streams(js: JetStreamContext, settings: BusSettings) -> None:
    """Create or update the streams; safe when many replicas start at once."""
    for config in stream_configs(settings):
        try:
            await js.add_stream(config=config)
        except BadRequestError as exc:
            if exc.err_code != 10058:  # "stream name already in use with a different configuration"
                raise
            await js.update_stream(config=config)


def events_stream() -> JStream:
    """The events stream as FastStream sees it; we declare it ourselves in ensure_streams."""
    return JStream(subjects.EVENTS_STREAM, declare=False)


# --- dead letters ----------------------------------------------------------------------


def _jsonable_body(body: bytes) -> dict[str, Any]:
    body = body[:_MAX_DLQ_PAYLOAD]
    try:
        return {"payload": body.decode("utf-8"), "payload_encoding": "utf-8"}
    except UnicodeDecodeError:
        return {"payload": base64.b64encode(body).decode(), "payload_encoding": "base64"}


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, PoisonMessage):
        return str(exc)
    if isinstance(exc, ValidationError):
        return f"invalid message: {describe_validation(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _is_poison(exc: BaseException) -> bool:
    return isinstance(exc, ValidationError | PoisonMessage | json.JSONDecodeError | UnicodeError)


class DeadLetterPolicy:
    """Builds the per-message middleware; ``attach`` gives it the broker to publish with."""

    def __init__(self, service: str, settings: BusSettings) -> None:
        self.service = service
        self.settings = settings
        self._broker: NatsBroker | None = None

    def attach(self, broker: NatsBroker) -> None:
        self._broker = broker

    def __call__(self, msg: Any, /, *, context: ContextRepo) -> _DeadLetterMiddleware:
        return _DeadLetterMiddleware(msg, context=context, policy=self)

    def backoff(self, delivered: int) -> float:
        return float(self.settings.retry_backoff_s * (2 ** max(0, delivered - 1)))

    async def dead_letter(self, raw: Msg, exc: BaseException, delivered: int) -> None:
        broker = self._broker
        if broker is None:  # pragma: no cover - attach() is part of create_broker
            raise RuntimeError("DeadLetterPolicy used before attach()")
        meta = raw.metadata
        headers = {
            k: v for k, v in (raw.headers or {}).items() if not k.startswith(_STRIP_HEADER_PREFIX)
        }
        letter = {
            "service": self.service,
            "reason": describe_error(exc),
            "error_type": type(exc).__name__,
            "subject": raw.subject,
            "stream": meta.stream,
            "stream_seq": meta.sequence.stream,
            "consumer": meta.consumer,
            "deliveries": delivered,
            "failed_at": utcnow().isoformat(),
            "headers": headers,
            **_jsonable_body(raw.data),
        }
        await broker.publish(
            letter,
            subjects.dlq_subject(self.service),
            stream=subjects.DLQ_STREAM,
            headers={
                **headers,
                "Nats-Msg-Id": f"dlq:{self.service}:{meta.stream}:{meta.sequence.stream}",
            },
        )
        log.error(
            "dead-lettered message",
            subject=raw.subject,
            reason=letter["reason"],
            deliveries=delivered,
            dlq=subjects.dlq_subject(self.service),
        )

    async def error_reply(self, raw: Msg, exc: BaseException) -> None:
        broker = self._broker
        if broker is None or not raw.reply:
            return
        reply = Reply(ok=False, error=describe_error(exc))
        await broker.publish(reply.model_dump(mode="json"), raw.reply)
        log.warning("rejected request", subject=raw.subject, error=reply.error)


class _DeadLetterMiddleware(BaseMiddleware):
    def __init__(self, msg: Any, /, *, context: ContextRepo, policy: DeadLetterPolicy) -> None:
        super().__init__(msg, context=context)
        self.policy = policy

    async def after_processed(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> bool | None:
        raw = self.msg
        if exc_val is None or isinstance(exc_val, asyncio.CancelledError) or raw is None:
            return False
        if not getattr(raw, "is_acked", True) and (raw.reply or "").startswith("$JS.ACK"):
            delivered = raw.metadata.num_delivered
            if _is_poison(exc_val) or delivered >= self.policy.settings.max_deliver:
                await self.policy.dead_letter(raw, exc_val, delivered)
                return True  # suppressed: the acknowledgement middleware acks it
            log.warning(
                "handler failed; will retry",
                subject=raw.subject,
                error=describe_error(exc_val),
                delivery=delivered,
                max_deliver=self.policy.settings.max_deliver,
            )
            raise NackMessage(delay=self.policy.backoff(delivered)) from exc_val
        if getattr(raw, "reply", None):
            await self.policy.error_reply(raw, exc_val)
            return True
        return False


class _TaskContextMiddleware(BaseMiddleware):
    """Binds ``task_id`` (from the subject ``agentbus.tasks.<task_id>.<type>``) to the
    logs and the current span of every event handler, and unbinds it afterwards."""

    async def consume_scope(self, call_next: Callable[[Any], Any], msg: Any) -> Any:
        subject = getattr(self.msg, "subject", "") or ""
        prefix = f"{subjects.EVENTS_ROOT}."
        if not subject.startswith(prefix):
            return await call_next(msg)
        task_id = subject[len(prefix) :].split(".", 1)[0]
        trace.get_current_span().set_attribute(semconv.TASK_ID, task_id)
        with structlog.contextvars.bound_contextvars(task_id=task_id):
            return await call_next(msg)


# --- broker ----------------------------------------------------------------------------


def jetstream(broker: NatsBroker) -> JetStreamContext:
    """A JetStream context on a connected broker's connection (``broker.connection``,
    FastStream's public accessor; a context is a thin wrapper over it)."""
    return broker.connection.jetstream()


def create_broker(
    service: str,
    settings: BusSettings,
    *,
    tracer_provider: TracerProvider | None = None,
    metrics: CollectorRegistry | None = None,
) -> NatsBroker:
    """A NatsBroker with tracing, metrics and dead-lettering; connects when started."""
    apply_nats_fixes()
    policy = DeadLetterPolicy(service, settings)
    middlewares: list[Any] = [NatsTelemetryMiddleware(tracer_provider=tracer_provider)]
    if metrics is not None:
        middlewares.append(NatsPrometheusMiddleware(registry=metrics, app_name=service))
    broker = NatsBroker(
        settings.servers,
        name=f"agentbus-{service}",
        middlewares=[*middlewares, _TaskContextMiddleware, policy],
        logger=structlog.get_logger("faststream"),
        log_level=logging.DEBUG,  # per-message "Received/Processed" lines only at debug
        max_reconnect_attempts=-1,
    )
    policy.attach(broker)
    return broker


def durable_subscriber(
    router: NatsBroker | NatsRouter,
    subject_filter: str,
    *,
    durable: str,
    settings: BusSettings,
    max_workers: int = 1,
    description: str | None = None,
) -> Callable[[Any], Any]:
    """Decorator: a durable pull consumer on the events stream, shared by all replicas.

    Failed handlers are nacked (retried with backoff), not terminated; the dead-letter
    middleware takes over after ``settings.max_deliver`` attempts.

    One message per fetch, however many workers: nats-py's ``fetch(batch=n)``, once it
    has a message, waits for the other n-1 until the fetch's deadline (5 s) unless the
    server says there are none, so a batch could sit on a message that had arrived
    (in a test, a parallel step started 3 s after its sibling). The workers still run
    up to ``max_workers`` handlers at once; the fetch loop only stops while all are busy."""
    return router.subscriber(
        subject_filter,
        stream=events_stream(),
        durable=durable,
        pull_sub=PullSub(batch_size=1, timeout=5.0),
        config=ConsumerConfig(max_deliver=settings.max_deliver, ack_wait=settings.ack_wait_s),
        ack_policy=AckPolicy.NACK_ON_ERROR,
        max_workers=max_workers,
        description=description,
    )


def event_subscriber(
    router: NatsBroker | NatsRouter,
    event_type: type[Event],
    *,
    durable: str,
    settings: BusSettings,
    max_workers: int = 1,
) -> Callable[[Any], Any]:
    """Decorator: a durable consumer for one event type from every task."""
    return durable_subscriber(
        router,
        subjects.event_type_filter(event_type.event_type),
        durable=durable,
        settings=settings,
        max_workers=max_workers,
        description=(event_type.__doc__ or "").strip() or None,
    )


E = TypeVar("E", bound=Event)


def event_route(
    router: NatsRouter,
    event_type: type[E],
    use_case: Callable[[Any, E], Awaitable[object]],
    *,
    uses: str,
    durable: str,
    settings: BusSettings,
    max_workers: int = 1,
) -> None:
    """Route one event type from every task to a use case: ``use_case(target, event)``,
    where ``target`` is what the service provided under the context key ``uses``
    (``Service.provide``), on a durable consumer shared by all replicas (see
    :func:`durable_subscriber`). The handler binds the event's step to the logs (the
    task too, as the bus's middleware does) and keeps the message in progress while the
    use case works, so a long one is not redelivered elsewhere."""
    beat_s = settings.ack_wait_s / 3

    async def handle(event: Event, msg: NatsMessage, target: Any) -> None:
        with structlog.contextvars.bound_contextvars(**_ids_of(event)):
            async with keep_in_progress(msg, every_s=beat_s):
                await use_case(target, event)  # type: ignore[arg-type]  # FastStream parsed it as E

    # FastStream parses the body and injects the arguments by the handler's annotations.
    # The event type and the context key are only known here, so they are set per route
    # (the route table of each service then reads as data, not as copies of a handler).
    handle.__annotations__ = {
        "event": event_type,
        "msg": NatsMessage,
        "target": Annotated[Any, Context(uses)],
        "return": None,
    }
    handle.__name__ = handle.__qualname__ = f"on_{event_type.event_type.replace('.', '_')}"
    event_subscriber(
        router, event_type, durable=durable, settings=settings, max_workers=max_workers
    )(handle)


def request_route(
    router: NatsRouter,
    subject: str,
    use_case: Callable[[Any, Any], Awaitable[Reply]],
    *,
    uses: str,
    queue: str,
    max_workers: int = 1,
    description: str | None = None,
) -> None:
    """Serve request/reply on ``subject`` (one queue group: replicas split the load) with
    ``use_case(target, request)``; ``target`` as in :func:`event_route`. The request and
    reply types are the use case's own annotations. The handler binds the request's task
    to the logs. A request that does not parse gets an error reply from the dead-letter
    middleware, never silence."""
    hints = typing.get_type_hints(use_case)
    request_type = next(t for name, t in hints.items() if name not in {"self", "return"})

    async def handle(request: BaseModel, target: Any) -> Reply:
        with structlog.contextvars.bound_contextvars(**_ids_of(request)):
            return await use_case(target, request)

    handle.__annotations__ = {  # as in event_route: the types are known per route only
        "request": request_type,
        "target": Annotated[Any, Context(uses)],
        "return": hints["return"],
    }
    handle.__name__ = handle.__qualname__ = use_case.__name__
    router.subscriber(subject, queue=queue, max_workers=max_workers, description=description)(
        handle
    )


def _ids_of(message: BaseModel) -> dict[str, str]:
    """The task and step a message is about, for the logs."""
    ids = {"task_id": getattr(message, "task_id", None)}
    ids["step_id"] = getattr(message, "step_id", None) or getattr(
        getattr(message, "step", None), "id", None
    )
    return {k: v for k, v in ids.items() if isinstance(v, str) and v}


async def publish_event(broker: NatsBroker, event: Event, *, timeout: float = 10.0) -> PubAck:
    """Publish a lifecycle event durably, de-duplicated by its event_id."""
    ack: PubAck = await broker.publish(
        event.model_dump(mode="json"),
        event.subject,
        stream=subjects.EVENTS_STREAM,
        headers={"Nats-Msg-Id": event.event_id},
        timeout=timeout,
    )
    return ack


class BusPublisher:
    """The :class:`~agentbus.core.ports.Publisher` port on a broker."""

    def __init__(self, broker: NatsBroker) -> None:
        self.broker = broker

    async def publish(self, event: Event) -> None:
        await publish_event(self.broker, event)


async def rpc(
    broker: NatsBroker,
    subject: str,
    request: BaseModel,
    reply_type: type[R],
    *,
    timeout: float,
) -> R:
    """Request/reply with a typed reply. Raises RpcError when nobody answers usefully."""
    try:
        msg = await broker.request(request.model_dump(mode="json"), subject, timeout=timeout)
    except nats.errors.NoRespondersError as exc:
        raise RpcError(f"no service is answering {subject} (is it running?)") from exc
    except TimeoutError as exc:
        raise RpcError(f"no reply on {subject} within {timeout:g}s") from exc
    try:
        return reply_type.model_validate_json(msg.body)
    except ValidationError as exc:
        raise RpcError(f"bad reply on {subject}: {describe_error(exc)}") from exc


def add_health_responder(
    router: NatsBroker | NatsRouter,
    service: str,
    check: Callable[[], Any] | None = None,
    fault: Callable[[], str | None] = lambda: None,
) -> None:
    """Answer ``agentbus.rpc.<service>.health`` so clients can tell a replica is ready.
    A replica with a ``fault`` (a start-up check failed) answers ``ok=False`` with it."""
    me = instance_id()

    @router.subscriber(subjects.health_subject(service), queue=f"agentbus-{service}-health")
    async def health(_: HealthRequest) -> HealthReply:
        if (reason := fault()) is not None:
            return HealthReply(
                ok=False, error=reason, service=service, instance=me, status="degraded"
            )
        ok = True
        if check is not None:
            result = check()
            ok = bool(await result) if asyncio.iscoroutine(result) else bool(result)
        return HealthReply(service=service, instance=me, status="ok" if ok else "degraded")
