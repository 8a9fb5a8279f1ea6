"""One task is one trace: the four services run in this process against the real
servers, sharing a tracer provider whose spans go to an in-memory exporter."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faststream import TestApp
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agentbus import executor, memory, planner, sandbox
from agentbus.cli import client
from agentbus.contracts import TaskCompleted, TaskSubmitted, new_id
from agentbus.core import semconv
from agentbus.core.llm import Transcript
from agentbus.core.settings import BusSettings, LLMSettings
from tests.support import eventually

pytestmark = pytest.mark.integration

PRIMES = Path(__file__).resolve().parents[2] / "examples" / "primes" / "transcript.json"


@contextlib.asynccontextmanager
async def four_services(
    provider: TracerProvider, nats_url: str, database_url: str, workspaces: Path
) -> AsyncIterator[None]:
    bus = BusSettings(nats_url=nats_url)
    llm = LLMSettings(provider="replay", replay_file=PRIMES)
    apps = [
        planner.create_app(planner.Settings(bus=bus, llm=llm), tracer_provider=provider),
        executor.create_app(executor.Settings(bus=bus, llm=llm), tracer_provider=provider),
        sandbox.create_app(
            sandbox.Settings(bus=bus, workspace_root=workspaces, pool_size=0),
            tracer_provider=provider,
        ),
        memory.create_app(
            memory.Settings(
                bus=bus, database_url=database_url, events_durable=f"memory-{new_id('tr')}"
            ),
            tracer_provider=provider,
        ),
    ]
    # asyncpg is instrumented once per process; an earlier test's memory app may have
    # bound it to its own provider. Start clean so this memory app binds ours.
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(instrumentor.uninstrument)
        for app in apps:
            await stack.enter_async_context(TestApp(app))
        yield


async def test_a_task_across_all_four_services_is_one_trace(
    nats_url: str, database_url: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    goal = Transcript.model_validate_json(PRIMES.read_text()).goal
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal)

    async with (
        four_services(provider, nats_url, database_url, tmp_path / "ws"),
        client.connect(nats_url, provider) as broker,
    ):
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span(semconv.SPAN_TASK) as root:
            await client.submit(broker, task)
            events = [e async for e in client.follow(broker, task.task_id, timeout=120)]
        assert isinstance(events[-1], TaskCompleted)
        trace_id = root.get_span_context().trace_id

        def in_trace() -> list[ReadableSpan]:
            return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]

        async def stored_spans() -> list[ReadableSpan]:
            return in_trace()

        # Memory stores the last events a moment after the CLI saw them.
        # The planner's last publish ends a moment after the client saw the event.
        done = f"{task.subject.rsplit('.', 2)[0]}.task.completed publish"
        await eventually(stored_spans, lambda spans: any(s.name == done for s in spans))

    spans = in_trace()
    by_id = {s.context.span_id: s for s in spans}
    names = [s.name for s in spans]
    # Every span hangs below another span of the same trace, up to the one root.
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == [semconv.SPAN_TASK]
    orphans = [s.name for s in spans if s.parent and s.parent.span_id not in by_id]
    assert not orphans, f"spans whose parent is missing: {orphans}"

    llm = [s for s in spans if s.name == "chat gpt-4o-mini"]
    assert len(llm) == 7  # plan, 2 + 3 executor turns, answer
    for span in llm:
        attrs = span.attributes or {}
        assert attrs[semconv.GEN_AI_RESPONSE_MODEL] == "gpt-4o-mini"
        assert attrs[semconv.GEN_AI_USAGE_INPUT_TOKENS] > 0
        assert attrs[semconv.COST_USD] > 0
        assert attrs[semconv.TASK_ID] == task.task_id

    execs = [s for s in spans if s.name == semconv.SPAN_SANDBOX_EXEC]
    assert len(execs) == 4  # two runs, each seen by the executor and by the sandbox
    for span in execs:
        attrs = span.attributes or {}
        assert attrs[semconv.SANDBOX_LANGUAGE] == "python"
        assert attrs[semconv.SANDBOX_OUTCOME] == "ok" and attrs[semconv.SANDBOX_EXIT_CODE] == 0
    assert {f"{semconv.SPAN_STEP} s1", f"{semconv.SPAN_STEP} s2"} <= set(names)
    assert f"{semconv.SPAN_MEMORY} search" in names  # recall at step start
    # Memory's SQL statements for the executor's recall and save are in the trace.
    assert {"SELECT", "INSERT"} <= set(names)
    # Step spans sit below the step.ready message the planner published.
    step = next(s for s in spans if s.name == f"{semconv.SPAN_STEP} s2")
    chain = []
    while step.parent is not None:
        step = by_id[step.parent.span_id]
        chain.append(step.name)
    assert chain[-1] == semconv.SPAN_TASK
    assert any("step.ready" in n for n in chain), chain
