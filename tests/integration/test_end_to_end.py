"""The example task through all four real services: nats-server with JetStream,
Postgres + pgvector, the Docker engine, each service in its own process, the replay
provider standing in for the LLM."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest
from faststream.nats import NatsBroker

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import (
    LLMCalled,
    StepCompleted,
    TaskCompleted,
    TaskFailed,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream
from tests.support import dead_letters, eventually, replay_stack, run_task

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PRIMES = ROOT / "examples" / "primes" / "transcript.json"
GOAL = json.loads(PRIMES.read_text())["goal"]


@pytest.fixture(scope="module")
async def stack(tmp_root: Path, nats_url: str, database_url: str) -> AsyncIterator[EmbeddedStack]:
    async with replay_stack(
        tmp_root / "e2e-home", PRIMES, nats_url=nats_url, database_url=database_url
    ) as running:
        yield running


@pytest.fixture
async def broker(stack: EmbeddedStack) -> AsyncIterator[NatsBroker]:
    async with client.connect(stack.nats_url or "") as b:
        yield b


async def test_example_task_runs_end_to_end(stack: EmbeddedStack, broker: NatsBroker) -> None:
    events = await run_task(broker, GOAL)
    task_id = events[0].task_id
    done = events[-1]
    assert isinstance(done, TaskCompleted), f"task did not complete: {done!r}"
    assert "639" in done.answer
    assert done.artifacts == ["primes.txt"]
    assert done.usage.total.calls == 7  # 1 plan + 2 + 3 executor turns + 1 answer
    assert done.usage.total.cost_usd > 0

    # The file really was written by code that ran in the task's container.
    primes = (stack.home / "workspaces" / task_id / "primes.txt").read_text().split()
    assert [int(p) for p in primes] == [
        2,
        3,
        5,
        7,
        11,
        13,
        17,
        19,
        23,
        29,
        31,
        37,
        41,
        43,
        47,
        53,
        59,
        61,
        67,
        71,
    ]

    # s2 ran after s1 and saw its output.
    completed = [e.step_id for e in events if isinstance(e, StepCompleted)]
    assert completed == ["s1", "s2"]

    # Memory holds the task's full history, in order.
    async def stored() -> list[str]:
        reply = await client.history(broker, task_id)
        return [e.type for e in reply.events] if reply.ok else []

    # Memory commits batches concurrently: wait for all of them, then check the order.
    types = await eventually(stored, lambda t: len(t) >= len(events))
    assert types == [e.event_type for e in events]
    lifecycle = [t for t in types if t != "llm.called"]
    assert lifecycle[:3] == ["task.submitted", "task.plan_created", "step.ready"]
    # Every LLM call was reported on its own, with its cost.
    calls = [e for e in events if isinstance(e, LLMCalled)]
    assert len(calls) == 7
    assert sum(c.usage.cost_usd for c in calls) == pytest.approx(done.usage.total.cost_usd)
    assert {c.role for c in calls} == {"planner", "executor"}
    reply = await client.history(broker, task_id)
    assert reply.task is not None
    assert reply.task.status.value == "completed"
    assert reply.task.answer == done.answer
    assert reply.task.usage.total.calls == 7
    steps = {step.id: step for step in reply.steps}
    assert steps["s1"].status == "completed" and steps["s2"].status == "completed"
    assert (steps["s1"].usage.total.calls, steps["s2"].usage.total.calls) == (2, 3)
    assert steps["s2"].usage.total.cost_usd > 0

    # The task's container is gone once the task is over.
    async def no_container() -> bool:
        async with aiodocker.Docker() as docker:
            found = await docker.containers.list(
                all=True, filters={"name": [f"^/agentbus-sbx-{task_id}$"]}
            )
        return not found

    await eventually(no_container, bool)  # the sandbox container must not outlive its task


async def test_malformed_events_are_dead_lettered_and_service_keeps_serving(
    stack: EmbeddedStack, broker: NatsBroker
) -> None:
    bad_id = new_id("bad")
    subject = f"agentbus.tasks.{bad_id}.task.submitted"
    await broker.publish(b"{this is not json", subject, stream=subjects.EVENTS_STREAM)
    await broker.publish(
        {"type": "task.submitted", "task_id": bad_id, "budget": {"max_steps": -1}},
        subject,
        stream=subjects.EVENTS_STREAM,
    )

    events = await run_task(broker, GOAL)  # the planner still serves good events
    assert isinstance(events[-1], TaskCompleted)

    js = jetstream(broker)
    letters = await eventually(
        lambda: dead_letters(js, "planner", subject), lambda found: len(found) >= 2
    )
    assert letters, "the malformed events did not reach agentbus.dlq.planner"
    reasons = sorted(str(letter["reason"]) for letter in letters)
    assert all(r.startswith("invalid message") for r in reasons)
    assert any("goal: Field required" in r for r in reasons)
    assert {letter["payload"] for letter in letters} >= {"{this is not json"}


async def test_unplannable_task_fails_with_a_reason(broker: NatsBroker) -> None:
    events = await run_task(broker, goal="something the recording never saw")
    failed = events[-1]
    assert isinstance(failed, TaskFailed)
    assert "planning failed" in failed.reason
    assert "first 20 prime numbers" in failed.reason  # the replay says what it expected


def test_run_without_llm_fails_at_once_with_a_hint(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AGENTBUS_HOME": str(tmp_path / "h")}
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "agentbus"), "run", "--task", "hello"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert "no LLM is configured" in proc.stderr
    assert "AGENTBUS_LLM_BASE_URL" in proc.stderr and "make demo" in proc.stderr
    assert not (tmp_path / "h").exists()  # nothing was started


def test_cli_runs_the_demo_on_the_embedded_stack_and_shows_history(pg_home: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(pg_home), "AGENTBUS_HOME": str(pg_home / "h")}
    agentbus = str(ROOT / ".venv" / "bin" / "agentbus")
    run = subprocess.run(
        [agentbus, "run", "--replay", str(PRIMES.parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "their sum is 639" in run.stdout
    assert "run_python" in run.stdout  # the code runs were shown live
    task_id = next(
        line.split()[1] for line in run.stdout.splitlines() if line.startswith("task tsk_")
    )
    show = subprocess.run(
        [agentbus, "tasks", "show", task_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert show.returncode == 0, show.stdout + show.stderr
    assert f"task {task_id}: completed" in show.stdout
    assert "task.completed" in show.stdout and "step.tool_called" in show.stdout
    assert processes_mentioning(str(pg_home)) == [], "the CLI left processes behind"


def processes_mentioning(marker: str) -> list[str]:
    """Processes whose command line or environment mention ``marker`` (no orphans check)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(
                (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
    return found
