"""Cancellation latency: how fast ``agentbus cancel`` stops a running task.

All four real services as processes (embedded nats-server + Postgres, real Docker, two
executor replicas), with the scripted OpenAI-compatible model of the service tests
(``tests/scripted_llm.py``) standing in for the LLM: each task gets a plan of two
independent steps, and each step runs ``time.sleep(120)`` in the task's sandbox, so both
steps sit in a long sandbox run when the cancel arrives.

For each task (a few at a time, to show behaviour under load): submit it, wait until the
model has seen both steps' first request and the task's container exists, let the runs
start (SETTLE_S), then publish ``TaskCancelRequested`` (what ``agentbus cancel`` does) and
measure, from that moment:

1. until ``task.cancelled`` reaches a client following the task (the target: p95 < 5 s),
   and until the planner stamped it (its ``occurred_at``, same host clock);
2. until the task's sandbox container is gone from the Docker engine;
3. LLM requests for the task that reached the model after ``task.cancelled`` (each
   task's goal carries a unique token, and every request quotes ``Task: <goal>``);
   must be 0. Also: requests after the cancel request, step events published after
   ``task.cancelled``, and running steps the executors report they stopped.

Publishing the request can raise ``JSONDecodeError`` although the stream stored it: the
executors' core-NATS subscribers to the cancel subject answer the JetStream publish's
reply inbox with an empty message, and now and then that beats the stream's ack. The
run counts these (``cancel_publish_errors``) instead of stopping.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiodocker
from faststream.nats import NatsBroker

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import (
    Event,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepToolCalled,
    TaskCancelled,
    TaskCancelRequested,
    TaskSubmitted,
    new_id,
    parse_event,
    subjects,
)
from agentbus.core.bus import jetstream

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the scripted model lives with the tests
from tests.scripted_llm import ScriptedLLM, llm_env, scripted_llm  # noqa: E402
from tests.support import stored  # noqa: E402

TASKS = 20
CONCURRENCY = 4
EXECUTORS = 2
STEPS = 2
SLEEP_CODE = "import time; time.sleep(120)"
SETTLE_S = 1.0  # after both steps asked the model and the container exists
AFTER_S = 3.0  # after the last task: time for a stray LLM call or step event to show
TARGET_P95_S = 5.0
CONTAINER_PREFIX = "agentbus-sbx-"
WORKSPACE_ROOT_LABEL = "agentbus.workspace_root"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Sample:
    task_id: str
    token: str
    requested: float = 0.0  # time.monotonic() of the cancel request
    cancelled: float = 0.0  # ... of task.cancelled reaching the client
    gone: float = 0.0  # ... of the container found gone
    published: float = 0.0  # task.cancelled's occurred_at minus the request's (planner)
    events: list[Event] = field(default_factory=list)
    publish_error: bool = False  # publishing the request raised, though it was stored


class BenchError(RuntimeError):
    """The run could not measure what it is for; the message says why."""


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float, every: float = 0.05
) -> None:
    """Poll ``check`` until it returns true; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise BenchError(f"{what} not seen within {timeout:g}s")
        await asyncio.sleep(every)


async def container_count(docker: aiodocker.Docker, task_id: str) -> int:
    found = await docker.containers.list(
        all=True, filters={"name": [f"^/{CONTAINER_PREFIX}{task_id}$"]}
    )
    return len(found)


async def follow_until_end(broker: NatsBroker, task_id: str) -> tuple[float, Event]:
    """Follow the task to its terminal event; when it arrived (monotonic) and the event."""
    arrived, last = 0.0, None
    async for event in client.follow(broker, task_id, timeout=120):
        arrived, last = time.monotonic(), event
    if last is None:
        raise BenchError(f"no events of {task_id}")
    return arrived, last


async def cancel_one(
    broker: NatsBroker, docker: aiodocker.Docker, script: ScriptedLLM, index: int
) -> Sample:
    token = uuid.uuid4().hex
    goal = f"Cancellation bench task {index} (token {token}): compute two parts."
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal)
    sample = Sample(task.task_id, token)

    def first_step_requests() -> int:
        with script._lock:
            return sum(
                1
                for s in script.seen
                if s.role == "step" and s.turns_done == 0 and token in s.step_prompt
            )

    async def both_steps_asked() -> bool:
        return first_step_requests() >= STEPS

    async def container_up() -> bool:
        return await container_count(docker, task.task_id) > 0

    async def container_gone() -> bool:
        return await container_count(docker, task.task_id) == 0

    follow = asyncio.create_task(follow_until_end(broker, task.task_id))
    try:
        await client.submit(broker, task)
        await wait_for(both_steps_asked, f"both steps of {task.task_id} asking the model", 60)
        await wait_for(container_up, f"the container of {task.task_id}", 30)
        await asyncio.sleep(SETTLE_S)
        if follow.done():
            _, end = follow.result()
            raise BenchError(f"{task.task_id} ended before the cancel: {end!r}")
        request = TaskCancelRequested(task_id=task.task_id, reason="bench")
        sample.requested = time.monotonic()
        try:
            await client.submit(broker, request)
        except json.JSONDecodeError:
            # The stream stored it, but an empty reply beat the stream's ack to the
            # publish's inbox (see the module docstring): count it and go on.
            sample.publish_error = True
        await wait_for(container_gone, f"the container of {task.task_id} gone", 60, every=0.02)
        sample.gone = time.monotonic()
        sample.cancelled, end = await follow
    finally:
        if not follow.done():
            follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)
    if not isinstance(end, TaskCancelled):
        raise BenchError(f"{task.task_id} did not end cancelled: {end!r}")
    sample.published = (end.occurred_at - request.occurred_at).total_seconds()
    return sample


async def all_events(broker: NatsBroker, task_id: str) -> list[Event]:
    """Every event of the task in the stream, including any after the terminal one."""
    events = []
    for data in await stored(jetstream(broker), subjects.task_filter(task_id)):
        with contextlib.suppress(ValueError):
            events.append(parse_event(data))
    return events


def steps_stopped(log_dir: Path) -> int:
    """Running steps the executor replicas say they cancelled (their JSON logs)."""
    stopped = 0
    for path in log_dir.glob("executor-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "cancelled running steps":
                    stopped += int(record.get("steps", 0))
    return stopped


async def remove_leftovers(workspaces: Path) -> None:
    """Containers of this run's tasks that a failed run left behind (the sandbox keeps a
    task's container across restarts, and our NATS store goes away with the run)."""
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(
            all=True, filters={"label": [f"{WORKSPACE_ROOT_LABEL}={workspaces}"]}
        )
        for container in found:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)


async def bench(home: Path, tasks: int, concurrency: int) -> tuple[list[Sample], ScriptedLLM, int]:
    try:
        return await _bench(home, tasks, concurrency)
    finally:
        await remove_leftovers(home / "workspaces")


async def _bench(home: Path, tasks: int, concurrency: int) -> tuple[list[Sample], ScriptedLLM, int]:
    script = ScriptedLLM(steps=STEPS, code=SLEEP_CODE)
    replicas = {"planner": 1, "executor": EXECUTORS, "sandbox": 1, "memory": 1}
    with scripted_llm(script):
        async with (
            EmbeddedStack(
                home=home, replicas=replicas, extra_env=llm_env(script), ephemeral_nats=True
            ) as stack,
            client.connect(stack.nats_url or "") as broker,
            aiodocker.Docker() as docker,
        ):
            gate = asyncio.Semaphore(concurrency)

            async def gated(index: int) -> Sample:
                async with gate:
                    return await cancel_one(broker, docker, script, index)

            samples = await asyncio.gather(*(gated(i) for i in range(tasks)))
            await asyncio.sleep(AFTER_S)
            stored = await asyncio.gather(*(all_events(broker, s.task_id) for s in samples))
            for sample, events in zip(samples, stored, strict=True):
                sample.events = events
            stack.check_alive()
    return list(samples), script, steps_stopped(home / "logs")


def late_step_events(samples: list[Sample]) -> list[tuple[float, Event]]:
    """Step events published after the task's ``task.cancelled``, with how long after."""
    kinds = (StepCompleted, StepFailed, StepPaused, StepToolCalled)
    late: list[tuple[float, Event]] = []
    for s in samples:
        ends = [e for e in s.events if isinstance(e, TaskCancelled)]
        if ends:
            rest = s.events[s.events.index(ends[0]) + 1 :]
            late += [
                ((e.occurred_at - ends[0].occurred_at).total_seconds(), e)
                for e in rest
                if isinstance(e, kinds)
            ]
    return late


def spread(name: str, values: list[float]) -> dict[str, float]:
    return {
        f"{name}_p50_s": round(statistics.median(values), 3),
        f"{name}_p95_s": round(pct(values, 0.95), 3),
        f"{name}_max_s": round(max(values), 3),
    }


def figures_of(
    samples: list[Sample], script: ScriptedLLM, stopped: int, concurrency: int
) -> dict[str, float | int]:
    after_cancelled = after_request = 0
    for s in samples:
        for seen in script.seen:
            if s.token in seen.step_prompt:
                after_request += seen.at > s.requested
                after_cancelled += seen.at > s.cancelled
    figures: dict[str, float | int] = {
        "tasks": len(samples),
        "concurrency": concurrency,
        "executor_replicas": EXECUTORS,
        **spread("cancel_to_cancelled", [s.cancelled - s.requested for s in samples]),
        **spread("cancelled_published", [s.published for s in samples]),
        **spread("container_gone", [s.gone - s.requested for s in samples]),
        "llm_calls_after_cancel": after_cancelled,
        "llm_calls_after_request": after_request,
        "step_events_after_cancelled": len(late_step_events(samples)),
        "running_steps_stopped": stopped,
        "running_steps": STEPS * len(samples),
        "cancel_publish_errors": sum(s.publish_error for s in samples),
    }
    figures["target_met"] = int(
        figures["cancel_to_cancelled_p95_s"] < TARGET_P95_S and after_cancelled == 0
    )
    return figures


def report(samples: list[Sample], f: dict[str, float | int], elapsed: float) -> None:
    print(
        f"cancellation: {f['tasks']} tasks, {f['concurrency']} at once, {STEPS} steps each "
        f"sleeping in the sandbox, {EXECUTORS} executor replicas ({elapsed:.0f}s in all)"
    )
    print(f"{'from the cancel request to':<34}{'n':>5}{'p50':>10}{'p95':>10}{'max':>10}")
    for name, key in (
        ("task.cancelled published (planner)", "cancelled_published"),
        ("task.cancelled at the client", "cancel_to_cancelled"),
        ("the task's container gone", "container_gone"),
    ):
        p50, p95, top = (f[f"{key}_{q}_s"] for q in ("p50", "p95", "max"))
        print(f"{name:<34}{f['tasks']:>5}{p50:>9.3f}s{p95:>9.3f}s{top:>9.3f}s")
    slowest = max(samples, key=lambda s: s.cancelled - s.requested)
    print(f"slowest: {slowest.task_id}")
    print(f"LLM requests after task.cancelled:    {f['llm_calls_after_cancel']}  (must be 0)")
    print(f"LLM requests after the cancel request: {f['llm_calls_after_request']}")
    print(f"step events after task.cancelled:     {f['step_events_after_cancelled']}")
    for delay, e in late_step_events(samples):
        step = getattr(e, "step_id", "")
        print(f"  {e.task_id} {step} {e.event_type}, {delay:.3f}s after task.cancelled")
    stopped, running = f["running_steps_stopped"], f["running_steps"]
    print(f"running steps the executors stopped:  {stopped} of {running}")
    print(f"cancel publishes that raised:         {f['cancel_publish_errors']}  (should be 0)")
    met = "met" if f["target_met"] else "NOT met"
    print(f"target: task.cancelled p95 < {TARGET_P95_S:g} s, no LLM call after it: {met}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks to cancel")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="tasks at once")
    parser.add_argument("--home", type=Path, help="keep the stack's home (logs/) here")
    args = parser.parse_args()

    started = time.monotonic()
    try:
        if args.home:
            home = args.home.resolve()
            home.mkdir(parents=True, exist_ok=True)
            samples, script, stopped = asyncio.run(bench(home, args.tasks, args.concurrency))
        else:
            with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
                samples, script, stopped = asyncio.run(
                    bench(Path(tmp), args.tasks, args.concurrency)
                )
    except BenchError as exc:
        raise SystemExit(f"bench_cancellation: {exc} (keep the logs with --home DIR)") from exc
    figures = figures_of(samples, script, stopped, args.concurrency)
    report(samples, figures, time.monotonic() - started)
    sys.stdout.flush()
    sys.stdout.write(json.dumps({"bench": "cancellation", **figures}) + "\n")


if __name__ == "__main__":
    main()
