"""Scenarios through all four real services with scripted models: every bundled example,
parallel steps on two executors, plan repair, unrepairable plans, a stuck model, and a
planner killed mid-task."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from faststream.nats import NatsBroker

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import (
    Budget,
    PlanCreated,
    StepCompleted,
    StepFailed,
    StepToolCalled,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    new_id,
    subjects,
)
from agentbus.core.llm import Transcript
from tests.support import eventually, replay_stack, run_task

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.parent.name for p in (ROOT / "examples").glob("*/transcript.json"))
SCENARIOS = ROOT / "tests" / "scenarios"
SECRET = "sk-test-never-logged-4f1c"  # noqa: S105 - a decoy, checked to stay out of logs


def goal_of(path: Path) -> str:
    return Transcript.model_validate_json(path.read_text()).goal


@pytest.fixture(scope="module")
async def stack(tmp_root: Path, nats_url: str, database_url: str) -> AsyncIterator[EmbeddedStack]:
    # One replay library: every example and every scenario, picked by the task's goal.
    library = tmp_root / "replay-library"
    library.mkdir()
    for name in EXAMPLES:
        (library / name).mkdir()
        (library / name / "transcript.json").symlink_to(
            ROOT / "examples" / name / "transcript.json"
        )
    for scenario in SCENARIOS.glob("*.json"):
        (library / scenario.name).symlink_to(scenario)
    async with replay_stack(
        tmp_root / "scenario-home",
        library,
        nats_url=nats_url,
        database_url=database_url,
        replicas={**dict.fromkeys(subjects.SERVICES, 1), "executor": 3},
        env={
            "AGENTBUS_EXECUTOR_CONCURRENCY": "1",  # so parallel steps need several executors
            "AGENTBUS_LLM_API_KEY": SECRET,  # must never reach a log line
        },
    ) as running:
        yield running


@pytest.fixture
async def broker(stack: EmbeddedStack) -> AsyncIterator[NatsBroker]:
    async with client.connect(stack.nats_url or "") as b:
        yield b


@pytest.mark.parametrize("example", EXAMPLES)
async def test_every_bundled_example_completes(
    stack: EmbeddedStack, broker: NatsBroker, example: str
) -> None:
    transcript = ROOT / "examples" / example / "transcript.json"
    events = await run_task(broker, goal_of(transcript))
    done = events[-1]
    assert isinstance(done, TaskCompleted), getattr(done, "reason", done)
    assert done.artifacts, "every example leaves a file in the workspace"
    for name in done.artifacts:
        assert (stack.home / "workspaces" / done.task_id / name).is_file()


async def test_recover_example_replans_after_a_failed_step(broker: NatsBroker) -> None:
    events = await run_task(broker, goal_of(ROOT / "examples" / "recover" / "transcript.json"))
    plans = [e for e in events if isinstance(e, PlanCreated)]
    failed = [e for e in events if isinstance(e, StepFailed)]
    assert [p.revision for p in plans] == [1, 2]
    assert [f.step_id for f in failed] == ["s1"]
    assert "numpy" in failed[0].error
    assert [s.id for s in plans[1].steps] == ["s2"]
    assert isinstance(events[-1], TaskCompleted)
    assert "858.5" in events[-1].answer


async def test_parallel_steps_run_on_two_executors_at_once(broker: NatsBroker) -> None:
    events = await run_task(broker, goal_of(SCENARIOS / "two_executors.json"))
    assert isinstance(events[-1], TaskCompleted)
    done = {e.step_id: e for e in events if isinstance(e, StepCompleted)}
    assert done["a"].worker and done["b"].worker
    assert done["a"].worker != done["b"].worker, "both steps ran on the same executor"
    runs = {
        e.step_id: (e.occurred_at - timedelta(milliseconds=e.duration_ms), e.occurred_at)
        for e in events
        if isinstance(e, StepToolCalled) and e.tool == "run_python"
    }
    (a_start, a_end), (b_start, b_end) = runs["a"], runs["b"]
    assert a_start < b_end and b_start < a_end, f"the runs did not overlap: {runs}"


async def test_steps_of_parallel_tasks_spread_over_all_three_executors(
    stack: EmbeddedStack, broker: NatsBroker
) -> None:
    goal = goal_of(SCENARIOS / "two_executors.json")
    runs = await asyncio.gather(*(run_task(broker, goal) for _ in range(3)))
    workers = {e.worker for events in runs for e in events if isinstance(e, StepCompleted)}
    executors = [p for p in stack.services.processes if p.name == "executor"]  # type: ignore[union-attr]
    assert len(executors) == 3
    assert len(workers) == 3, f"6 parallel steps ran on only {workers}"


async def test_each_replica_serves_metrics_and_health(stack: EmbeddedStack) -> None:
    group = stack.services
    assert group is not None
    async with httpx.AsyncClient(timeout=5) as http:
        for p in group.processes:
            ready = await http.get(f"{p.url}/readyz")
            assert ready.status_code == 200, f"{p.name}[{p.index}] not ready: {ready.text}"
            assert (await http.get(f"{p.url}/healthz")).status_code == 204
        executor = next(p for p in group.processes if p.name == "executor")
        metrics = (await http.get(f"{executor.url}/metrics")).text
        planner = next(p for p in group.processes if p.name == "planner")
        planner_metrics = (await http.get(f"{planner.url}/metrics")).text
    # The tests above ran tasks through these replicas.
    assert 'faststream_received_processed_messages_total{app_name="executor"' in metrics
    assert 'agentbus_consumer_pending{durable="executor-steps"}' in metrics
    assert "agentbus_llm_calls_total{" in metrics and 'role="executor"' in metrics
    assert 'agentbus_llm_tokens_total{kind="input",model="gpt-4o-mini",role="planner"}' in (
        planner_metrics
    )
    assert "agentbus_llm_cost_usd_total" in planner_metrics


async def test_invalid_plan_json_is_repaired(broker: NatsBroker) -> None:
    events = await run_task(broker, goal_of(SCENARIOS / "repair.json"))
    assert isinstance(events[-1], TaskCompleted)
    assert events[-1].answer == "hello, world"
    assert events[-1].usage.total.calls == 4  # two planning calls, one step, one answer


async def test_unrepairable_plan_fails_with_the_validation_error(broker: NatsBroker) -> None:
    events = await run_task(broker, goal_of(SCENARIOS / "unrepairable.json"))
    failed = events[-1]
    assert isinstance(failed, TaskFailed)
    assert failed.reason == (
        "planning failed: the LLM gave no valid plan after one repair: "
        "no JSON object in the reply: 'Still no plan, sorry.'"
    )


async def test_a_stuck_model_is_stopped_by_the_loop_detector(broker: NatsBroker) -> None:
    events = await run_task(broker, goal_of(SCENARIOS / "stuck.json"), Budget(max_replans=0))
    failed = events[-1]
    assert isinstance(failed, TaskFailed)
    assert "repeated the same action 3 times in a row (list_files {})" in failed.reason
    assert sum(isinstance(e, StepToolCalled) for e in events) == 2


async def test_a_planner_killed_mid_task_is_replaced_and_the_task_finishes(
    stack: EmbeddedStack, broker: NatsBroker
) -> None:
    group = stack.services
    assert group is not None
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal_of(SCENARIOS / "planner_crash.json"))
    task_id = task.task_id
    await client.submit(broker, task)
    events = client.follow(broker, task_id, timeout=60)
    async for event in events:
        if event.event_type == "step.ready":
            break  # s1 is running (it sleeps 4 s): kill the planner now
    await events.aclose()
    (planner,) = [p for p in group.processes if p.name == "planner"]
    planner.proc.send_signal(signal.SIGKILL)
    planner.proc.wait(10)
    group.processes.remove(planner)
    group.start({"planner": 1})  # a fresh replica with no memory of the task

    async def outcome() -> list[str]:
        reply = await client.history(broker, task_id)
        return [e.type for e in reply.events] if reply.ok else []

    types = await eventually(outcome, lambda t: "task.completed" in t or "task.failed" in t, 60)
    assert types[-1] == "task.completed", types
    reply = await client.history(broker, task_id)
    assert reply.task is not None and reply.task.answer == "finished by another planner"
    assert json.dumps(types).count("step.completed") == 2


def test_service_logs_carry_task_and_trace_ids_and_no_secrets(stack: EmbeddedStack) -> None:
    logs = sorted((stack.home / "logs").glob("*.log"))
    assert {p.name.split("-")[0] for p in logs} >= set(subjects.SERVICES)
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert SECRET not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    started = [line for line in lines if line.get("event") == "step started"]
    assert started, "no executor log line for a started step"
    for line in started:
        assert line["service"] == "executor"
        assert line["task_id"].startswith("tsk_") and line["step_id"]
        assert len(line["trace_id"]) == 32 and len(line["span_id"]) == 16
