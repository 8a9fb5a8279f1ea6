"""The sandbox service's routes and use cases through FastStream's ``TestNatsBroker``,
on a broker with the bus's middlewares (``create_broker``), and an in-memory sandbox
engine that never runs code (``tests.fakes.ScriptedSandboxEngine``). The real Docker
sandbox behind the same routes is proved by tests/integration/test_sandbox_service.py.

``TestNatsBroker`` runs the broker's middlewares, but its ``request`` sends no reply
subject, so the dead-letter middleware cannot answer a malformed request there (the
validation error is re-raised instead): those tests publish with ``reply_to`` and read
the answer off that subject, as a NATS client's inbox would get it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from faststream.nats import NatsBroker, TestNatsBroker
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from agentbus.contracts import (
    Event,
    ExecOutcome,
    FileInfo,
    Language,
    Reply,
    SandboxDestroyReply,
    SandboxDestroyRequest,
    SandboxExecReply,
    SandboxExecRequest,
    SandboxListFilesReply,
    SandboxListFilesRequest,
    SandboxReadFileReply,
    SandboxReadFileRequest,
    SandboxWriteFileReply,
    SandboxWriteFileRequest,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    new_id,
    subjects,
)
from agentbus.core import semconv
from agentbus.core.bus import create_broker, rpc
from agentbus.core.settings import BusSettings
from agentbus.sandbox.adapters.metrics import SandboxMetrics
from agentbus.sandbox.domain import InvalidRequest, SandboxError
from agentbus.sandbox.routes import USES, build_router
from agentbus.sandbox.usecases import SandboxRequests
from tests.fakes import ScriptedSandboxEngine
from tests.fakes.sandbox_engine import Run

INBOX = "test.sandbox.inbox"


@dataclass
class Rig:
    broker: NatsBroker
    engine: ScriptedSandboxEngine
    uses: SandboxRequests
    registry: CollectorRegistry
    spans: InMemorySpanExporter
    inbox: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, subject: str, request: BaseModel, reply_type: type[Any]) -> Any:
        return await rpc(self.broker, subject, request, reply_type, timeout=5)

    def runs_counted(self, language: str, outcome: str) -> float:
        labels = {"language": language, "outcome": outcome}
        return self.registry.get_sample_value("agentbus_sandbox_exec_seconds_count", labels) or 0

    def exec_span(self) -> ReadableSpan:
        finished = self.spans.get_finished_spans()
        (span,) = [s for s in finished if s.name == semconv.SPAN_SANDBOX_EXEC]
        return span


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    engine = ScriptedSandboxEngine()
    registry = CollectorRegistry()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    uses = SandboxRequests(
        sandbox=engine, tracer=provider.get_tracer("test"), metrics=SandboxMetrics(registry)
    )
    broker = create_broker("sandbox", BusSettings())
    broker.include_router(build_router(BusSettings(), concurrency=2))
    broker.context.set_global(USES, uses)
    rig = Rig(broker, engine, uses, registry, spans)

    @broker.subscriber(INBOX)
    async def inbox(body: dict[str, Any]) -> None:
        rig.inbox.append(body)

    async with TestNatsBroker(broker) as test_broker:
        rig.broker = test_broker
        yield rig


# --- exec ---------------------------------------------------------------------------------


async def test_a_run_s_reply_reaches_the_caller_with_its_outcome(rig: Rig) -> None:
    task_id = new_id("tsk")
    scripted = SandboxExecReply(
        exit_code=1,
        stderr="Traceback ...\nZeroDivisionError: division by zero\n",
        duration_ms=12.5,
        outcome=ExecOutcome.ERROR,
        cpu_seconds=0.25,
    )
    rig.engine.script.append(scripted)
    request = SandboxExecRequest(
        task_id=task_id,
        language=Language.BASH,
        code="echo $X; exit 1",
        env={"X": "1"},
        stdin="in",
        timeout_s=5,
    )

    reply = await rig.call(subjects.SANDBOX_EXEC, request, SandboxExecReply)

    assert reply == scripted
    assert rig.engine.runs == [Run(task_id, Language.BASH, "echo $X; exit 1", 5, {"X": "1"}, "in")]
    assert rig.runs_counted("bash", "error") == 1
    span = rig.exec_span()
    assert span.attributes is not None
    assert span.attributes[semconv.TASK_ID] == task_id
    assert span.attributes[semconv.SANDBOX_LANGUAGE] == "bash"
    assert span.attributes[semconv.SANDBOX_OUTCOME] == "error"
    assert span.attributes[semconv.SANDBOX_EXIT_CODE] == 1


def logged(logs: Sequence[Mapping[str, Any]], event: str) -> list[tuple[str, str, str]]:
    return [(e["log_level"], e["task_id"], e["error"]) for e in logs if e["event"] == event]


async def test_a_refused_run_answers_ok_false_with_the_reason(rig: Rig) -> None:
    task_id = new_id("tsk")
    rig.engine.script.append(InvalidRequest("environment variable name 'A B' is not allowed"))
    request = SandboxExecRequest(task_id=task_id, code="print(1)", env={"A B": "1"})

    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        reply = await rig.call(subjects.SANDBOX_EXEC, request, SandboxExecReply)

    assert (reply.ok, reply.error) == (False, "environment variable name 'A B' is not allowed")
    # Refused, not failed: the caller's mistake is no alert for the operator.
    assert logged(logs, "refused request") == [("info", task_id, reply.error)]
    assert logged(logs, "request failed") == []
    assert reply.exit_code is None
    assert rig.runs_counted("python", "refused") == 1
    assert rig.runs_counted("python", "error") == 0
    span = rig.exec_span()
    assert span.attributes is not None
    assert span.attributes[semconv.SANDBOX_OUTCOME] == "refused"
    assert semconv.SANDBOX_EXIT_CODE not in span.attributes


# --- files --------------------------------------------------------------------------------


async def test_files_written_are_read_and_listed_by_workspace_path(rig: Rig) -> None:
    task_id = new_id("tsk")

    written = await rig.call(
        subjects.SANDBOX_WRITE_FILE,
        SandboxWriteFileRequest(task_id=task_id, path="/workspace/data/x.csv", content="a,b\n"),
        SandboxWriteFileReply,
    )
    head = await rig.call(
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id=task_id, path="data/x.csv", max_bytes=2),
        SandboxReadFileReply,
    )
    listing = await rig.call(
        subjects.SANDBOX_LIST_FILES, SandboxListFilesRequest(task_id=task_id), SandboxListFilesReply
    )

    assert (written.ok, written.path, written.size) == (True, "data/x.csv", 4)
    assert (head.content, head.size, head.truncated) == ("a,", 4, True)
    assert listing.files == [FileInfo(path="data/x.csv", size=4)]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../etc/passwd", "path '../etc/passwd' leaves the workspace"),
        ("/etc/passwd", "absolute path '/etc/passwd' is not allowed"),
    ],
)
async def test_a_path_outside_the_workspace_is_refused_with_the_reason(
    rig: Rig, path: str, reason: str
) -> None:
    task_id = new_id("tsk")

    write = await rig.call(
        subjects.SANDBOX_WRITE_FILE,
        SandboxWriteFileRequest(task_id=task_id, path=path, content="x"),
        SandboxWriteFileReply,
    )
    read = await rig.call(
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id=task_id, path=path),
        SandboxReadFileReply,
    )

    for reply in (write, read):
        assert reply.ok is False
        assert reply.error is not None and reason in reply.error
    assert rig.engine.files.get(task_id, {}) == {}


REQUESTS: list[tuple[str, BaseModel, type[Reply]]] = [
    (subjects.SANDBOX_EXEC, SandboxExecRequest(task_id="t1", code="print(1)"), SandboxExecReply),
    (
        subjects.SANDBOX_WRITE_FILE,
        SandboxWriteFileRequest(task_id="t1", path="a.txt", content="x"),
        SandboxWriteFileReply,
    ),
    (
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id="t1", path="a.txt"),
        SandboxReadFileReply,
    ),
    (subjects.SANDBOX_LIST_FILES, SandboxListFilesRequest(task_id="t1"), SandboxListFilesReply),
    (subjects.SANDBOX_DESTROY, SandboxDestroyRequest(task_id="t1"), SandboxDestroyReply),
]


@pytest.mark.parametrize(("subject", "request_", "reply_type"), REQUESTS)
async def test_engine_trouble_answers_every_request_ok_false(
    rig: Rig, subject: str, request_: BaseModel, reply_type: type[Reply]
) -> None:
    rig.engine.broken = SandboxError("the Docker engine did not answer; is it running?")

    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        reply = await rig.call(subject, request_, reply_type)

    assert isinstance(reply, reply_type)
    assert (reply.ok, reply.error) == (False, "the Docker engine did not answer; is it running?")
    assert logged(logs, "request failed") == [("warning", "t1", reply.error)]


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"code": "print(1)"}, "task_id: Field required"),
        ({"task_id": "t1", "code": "print(1)", "timeout_s": -1}, "timeout_s"),
        (b"{not json", "invalid message"),
    ],
)
async def test_a_malformed_request_gets_an_error_reply_from_the_bus(
    rig: Rig, payload: dict[str, Any] | bytes, problem: str
) -> None:
    await rig.broker.publish(payload, subjects.SANDBOX_EXEC, reply_to=INBOX)

    (reply,) = rig.inbox
    assert reply["ok"] is False
    assert reply["error"].startswith("invalid message") and problem in reply["error"]
    assert rig.engine.runs == []


# --- a task's end -------------------------------------------------------------------------


def ended(kind: type[Event], task_id: str) -> Event:
    if kind is TaskCompleted:
        return TaskCompleted(task_id=task_id, answer="42")
    if kind is TaskFailed:
        return TaskFailed(task_id=task_id, reason="the step failed")
    return TaskCancelled(task_id=task_id, reason="cancelled by user")


async def start_sandbox(rig: Rig, task_id: str) -> None:
    request = SandboxExecRequest(task_id=task_id, code="print(1)")
    assert (await rig.call(subjects.SANDBOX_EXEC, request, SandboxExecReply)).ok


@pytest.mark.parametrize("kind", [TaskCompleted, TaskFailed, TaskCancelled])
async def test_a_task_s_end_removes_its_sandbox_only(rig: Rig, kind: type[Event]) -> None:
    task_id, other = new_id("tsk"), new_id("tsk")
    await start_sandbox(rig, task_id)
    await start_sandbox(rig, other)

    event = ended(kind, task_id)
    await rig.broker.publish(event.model_dump(mode="json"), event.subject)

    assert rig.engine.destroyed == [task_id]
    assert rig.engine.live == {other}


async def test_engine_trouble_at_a_task_s_end_fails_the_handler_for_a_retry(rig: Rig) -> None:
    # A raised error is what makes JetStream redeliver with back-off (not simulated here).
    rig.engine.broken = SandboxError("removing the sandbox failed: engine busy")
    event = TaskCompleted(task_id=new_id("tsk"), answer="42")

    with pytest.raises(SandboxError, match="engine busy"):
        await rig.broker.publish(event.model_dump(mode="json"), event.subject)


async def test_destroy_says_whether_a_container_was_removed(rig: Rig) -> None:
    task_id = new_id("tsk")
    await start_sandbox(rig, task_id)
    request = SandboxDestroyRequest(task_id=task_id)

    first = await rig.call(subjects.SANDBOX_DESTROY, request, SandboxDestroyReply)
    again = await rig.call(subjects.SANDBOX_DESTROY, request, SandboxDestroyReply)

    assert (first.ok, first.destroyed) == (True, True)
    assert (again.ok, again.destroyed) == (True, False)


async def test_ready_means_the_engine_answers(rig: Rig) -> None:
    assert await rig.uses.ready()
    rig.engine.broken = SandboxError("engine down")
    assert not await rig.uses.ready()
