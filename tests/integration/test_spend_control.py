"""Spend control through the real services (real nats-server, Postgres, Docker), with a
scripted model behind a real OpenAI-compatible HTTP server: budgets are reserved before
every call and never overshot, a task pauses for approval and resumes the exact step
after every service restarted, approvals time out, and cancellation stops a task."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import aiodocker
import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import (
    Budget,
    BudgetExhausted,
    BudgetKind,
    BudgetWarning,
    Event,
    LLMCalled,
    OnBudget,
    StepCompleted,
    StepFailed,
    StepPaused,
    TaskApproved,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    new_id,
    parse_event,
    subjects,
)
from agentbus.core.budget import BudgetLedger, LedgerStatus
from tests.scripted_llm import Reply, ScriptedLLM, Seen, llm_env, scripted_llm
from tests.support import eventually, start_nats

pytestmark = pytest.mark.integration

SERVICES = dict.fromkeys(subjects.SERVICES, 1)


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    """Each test's stack on a JetStream of its own: a task one test leaves paused or
    pending is never resumed by the next test's services."""
    server = start_nats(tmp_path, "test")
    yield server.url
    server.stop()


@contextlib.asynccontextmanager
async def stack(
    home: Path,
    script: ScriptedLLM,
    *,
    nats_url: str,
    database_url: str,
    replicas: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[EmbeddedStack]:
    async with EmbeddedStack(
        home=home,
        replicas=replicas or SERVICES,
        extra_env=llm_env(script, **(env or {})),
        nats_url=nats_url,
        database_url=database_url,
    ) as running:
        yield running


class Watch:
    """Every event of one task, collected live from the stream."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]

    async def until(self, done: Callable[[list[Event]], bool], timeout: float = 60) -> None:
        async def fetch() -> list[Event]:
            return self.events

        await eventually(fetch, done, timeout=timeout)


@contextlib.asynccontextmanager
async def watching(nats_url: str, task_id: str) -> AsyncIterator[Watch]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    watch = Watch()

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            watch.events.append(parse_event(msg.data))

    sub = await js.subscribe(
        subjects.task_filter(task_id),
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        yield watch
    finally:
        await sub.unsubscribe()
        await nc.close()


async def submit(nats_url: str, goal: str, budget: Budget) -> str:
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal, budget=budget)
    async with client.connect(nats_url) as broker:
        await client.submit(broker, task)
    return task.task_id


async def publish(nats_url: str, event: Event) -> None:
    async with client.connect(nats_url) as broker:
        await client.submit(broker, event)


async def ledger_of(nats_url: str, task_id: str) -> object:
    nc = await nats.connect(nats_url)
    try:
        return await (await BudgetLedger.open(nc.jetstream())).load(task_id)
    finally:
        await nc.close()


def llm_cost(watch: Watch) -> float:
    return sum(e.usage.cost_usd for e in watch.of(LLMCalled))  # type: ignore[attr-defined]


async def test_racing_steps_never_overshoot_the_cost_budget(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """Twelve parallel steps (four at a time on the executor) race for the last of a
    budget that cannot pay for all of them (the whole task costs about $0.0056): the
    ledger warns at 80%, refuses the calls that could cross the budget, and the spend
    stays within it."""
    limit = 0.005
    with scripted_llm(ScriptedLLM(steps=12, usage_ratio=0.8)) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(
                nats_url, "race for the budget", Budget(max_cost_usd=limit, max_steps=12)
            )
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, BudgetExhausted) for e in ev))
                # Let every step that was running settle its last call.
                await asyncio.sleep(2)
                ledger = await ledger_of(nats_url, task_id)
                await publish(nats_url, TaskCancelRequested(task_id=task_id))
                await watch.until(lambda ev: any(isinstance(e, TaskCancelled) for e in ev))

    (warning,) = watch.of(BudgetWarning)
    assert warning.figure.kind is BudgetKind.COST  # type: ignore[attr-defined]
    assert warning.figure.used >= 0.8 * limit  # type: ignore[attr-defined]
    (exhausted,) = watch.of(BudgetExhausted)
    assert exhausted.action is OnBudget.PAUSE  # type: ignore[attr-defined]
    assert "cost budget exhausted" in exhausted.reason  # type: ignore[attr-defined]
    assert f"agentbus approve {task_id} --add-cost" in exhausted.reason  # type: ignore[attr-defined]
    # The money: what the model billed, what the ledger says, and the budget.
    calls = watch.of(LLMCalled)
    assert len(calls) == script.count() >= 5  # every call the server served was reported
    assert llm_cost(watch) <= limit
    assert ledger.spent.cost_usd == pytest.approx(llm_cost(watch))  # type: ignore[attr-defined]
    assert ledger.spent.cost_usd <= limit  # type: ignore[attr-defined]
    # Some steps could not finish: they paused rather than fail.
    assert watch.of(StepPaused)
    assert not watch.of(StepFailed)


async def test_paused_task_survives_a_restart_of_every_service_and_resumes_its_step(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """Three LLM calls: the plan and the first turn of both parallel steps. Their second
    turns are refused, so both steps pause with their dialogue checkpointed. Every
    service stops; a new stack, an approval from the CLI, and both steps go on from
    where they stopped."""
    first_turns = threading.Barrier(2)

    def first_turns_together(seen: Seen) -> None:
        # Each step's first turn waits for the other's, so both are made before either
        # step's second turn however far apart the two steps are delivered.
        if seen.role == "step" and seen.turns_done == 0:
            with contextlib.suppress(threading.BrokenBarrierError):
                first_turns.wait(timeout=30)

    with scripted_llm(ScriptedLLM(steps=2, hook=first_turns_together)) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(nats_url, "pause and resume", Budget(max_llm_calls=3))
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: len([e for e in ev if isinstance(e, StepPaused)]) == 2)
        assert script.count() == 3
        (exhausted,) = watch.of(BudgetExhausted)
        assert exhausted.figure.kind is BudgetKind.LLM_CALLS  # type: ignore[attr-defined]
        assert exhausted.approval_deadline is not None  # type: ignore[attr-defined]
        # Every service is down now. Nothing was lost: a new stack picks the task up.
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            approve = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "agentbus.cli", "approve", task_id, "--add-calls", "5"],
                env={**os.environ, "AGENTBUS_NATS_URL": nats_url},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert approve.returncode == 0, approve.stderr
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskCompleted) for e in ev))

    steps = [s for s in script.seen if s.role == "step"]
    for step_id in ("s1", "s2"):
        mine = [s for s in steps if f"Your step: {step_id} " in s.step_prompt]
        # Each step ran its code once and finished once: after approval it went on from
        # its checkpoint (one turn done) instead of starting again.
        assert [s.turns_done for s in mine] == [0, 1], step_id
    assert [s.role for s in script.seen[3:]] == ["step", "step", "answer"]
    (done,) = watch.of(TaskCompleted)
    assert done.answer == "answer: every part is done"  # type: ignore[attr-defined]
    ledger = await ledger_of(nats_url, task_id)
    assert ledger.spent.llm_calls == 6  # type: ignore[attr-defined]
    assert ledger.limits.llm_calls == 8  # type: ignore[attr-defined]


async def test_no_approval_in_time_fails_the_task_with_the_reason(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """The planner's own first call does not fit: the task pauses while planning, and
    fails when no approval comes within its approval timeout."""
    with scripted_llm(ScriptedLLM()) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(
                nats_url,
                "too poor to plan",
                Budget(max_cost_usd=0.00001, approval_timeout_s=1.0),
            )
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskFailed) for e in ev))
    assert script.count() == 0  # no call was made that could overshoot
    (exhausted,) = watch.of(BudgetExhausted)
    assert exhausted.step_id == ""  # type: ignore[attr-defined]
    (failed,) = watch.of(TaskFailed)
    assert "cost budget exhausted" in failed.reason  # type: ignore[attr-defined]
    assert "no approval came within" in failed.reason  # type: ignore[attr-defined]


async def test_a_cost_budget_on_a_model_without_a_price_fails_with_the_fix(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """A model missing from the price table would count $0: a task with a cost budget
    fails at its first call with what to do, and no request is made."""
    with scripted_llm(ScriptedLLM()) as script:
        env = {"AGENTBUS_LLM_MODEL": "my-local-model"}
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url, env=env):
            task_id = await submit(nats_url, "priced?", Budget(max_cost_usd=1.0))
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskFailed) for e in ev))
    assert script.count() == 0
    (failed,) = watch.of(TaskFailed)
    assert "model 'my-local-model' has no price" in failed.reason  # type: ignore[attr-defined]
    assert "AGENTBUS_LLM_PRICES_FILE" in failed.reason  # type: ignore[attr-defined]


async def test_fail_policy_fails_at_once(tmp_path: Path, nats_url: str, database_url: str) -> None:
    with scripted_llm(ScriptedLLM(steps=2)) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(
                nats_url,
                "fail when poor",
                Budget(max_llm_calls=2, on_exhausted=OnBudget.FAIL),
            )
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskFailed) for e in ev))
                await asyncio.sleep(1)
    assert script.count() == 2
    (failed,) = watch.of(TaskFailed)
    assert "llm_calls budget exhausted: 2 LLM calls spent of 2 LLM calls" in failed.reason  # type: ignore[attr-defined]
    ledger = await ledger_of(nats_url, task_id)
    assert ledger.status is LedgerStatus.CLOSED  # type: ignore[attr-defined]


async def test_cancel_mid_step_stops_the_loop_and_destroys_the_container(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    with scripted_llm(ScriptedLLM(code="import time; time.sleep(60)")) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(nats_url, "a long sleep", Budget())
            async with watching(nats_url, task_id) as watch:

                async def containers() -> list[object]:
                    async with aiodocker.Docker() as docker:
                        return list(
                            await docker.containers.list(
                                all=True, filters={"name": [f"^/agentbus-sbx-{task_id}$"]}
                            )
                        )

                async def step_calls() -> int:
                    return script.count("step")

                await eventually(step_calls, lambda n: n >= 1)
                await eventually(containers, bool)
                await asyncio.sleep(1)  # the sandbox run is under way
                await publish(nats_url, TaskCancelRequested(task_id=task_id, reason="enough"))
                await watch.until(lambda ev: any(isinstance(e, TaskCancelled) for e in ev), 20)
                calls = script.count()
                await eventually(containers, lambda found: not found, timeout=20)
                await asyncio.sleep(1.5)
    assert script.count() == calls  # no LLM call after the cancellation
    assert [s.role for s in script.seen] == ["plan", "step"]
    (cancelled,) = watch.of(TaskCancelled)
    assert cancelled.reason == "enough"  # type: ignore[attr-defined]
    assert not watch.of(StepCompleted) and not watch.of(StepFailed)
    ledger = await ledger_of(nats_url, task_id)
    assert ledger.status is LedgerStatus.CLOSED  # type: ignore[attr-defined]
    assert ledger.reservations == {}  # type: ignore[attr-defined]


async def test_time_budget_pauses_a_running_step_and_more_time_resumes_it(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """The step's code outlives the task's 2 s; the planner's deadline sweep pauses the
    task, the step stops at its next LLM call, and an approval with more time lets it
    finish from where it stopped."""
    with scripted_llm(ScriptedLLM(code="import time; time.sleep(3); print('slept')")) as script:
        async with stack(tmp_path, script, nats_url=nats_url, database_url=database_url):
            task_id = await submit(nats_url, "slow work", Budget(max_wall_seconds=2))
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, StepPaused) for e in ev))
                (exhausted,) = watch.of(BudgetExhausted)
                assert exhausted.figure.kind is BudgetKind.TIME  # type: ignore[attr-defined]
                assert "--add-time" in exhausted.reason  # type: ignore[attr-defined]
                await publish(nats_url, TaskApproved(task_id=task_id, add_wall_seconds=60))
                await watch.until(lambda ev: any(isinstance(e, TaskCompleted) for e in ev))
    assert [(s.role, s.turns_done) for s in script.seen] == [
        ("plan", 0),
        ("step", 0),
        ("step", 1),  # after the approval: the tool's result was kept
        ("answer", 0),
    ]
    assert "slept" in str(script.seen[2].body["messages"][-1]["content"])


def three_executors(
    home: Path, script: ScriptedLLM, nats_url: str, database_url: str, limits: dict[str, str]
) -> contextlib.AbstractAsyncContextManager[EmbeddedStack]:
    """Three executor replicas taking one step at a time, with their own rate limiter
    (a fresh API key is a fresh limiter)."""
    env = {
        **limits,
        "AGENTBUS_EXECUTOR_CONCURRENCY": "1",
        "AGENTBUS_LLM_API_KEY": f"sk-{new_id('k')}",
    }
    replicas = {**SERVICES, "executor": 3}
    return stack(
        home, script, nats_url=nats_url, database_url=database_url, replicas=replicas, env=env
    )


async def test_three_executor_replicas_share_one_requests_per_minute_limit(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """RPM 5 for the whole cluster: the plan and three steps' first turns (on three
    executor replicas) use four; one more call goes through; the two callers left wait
    their bound, then fail with a reason naming the limit."""
    with scripted_llm(ScriptedLLM(steps=3)) as script:
        limits = {"AGENTBUS_LLM_RPM": "5", "AGENTBUS_LLM_RATE_LIMIT_MAX_WAIT_S": "2"}
        async with three_executors(tmp_path, script, nats_url, database_url, limits):
            task_id = await submit(nats_url, "share the rate", Budget(max_replans=0))
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskFailed) for e in ev))
                await asyncio.sleep(1)  # any straggling call would show now
    assert script.count() == 5  # in the 60 s window, across four processes
    (failed,) = watch.of(TaskFailed)
    assert "AGENTBUS_LLM_RPM" in failed.reason  # type: ignore[attr-defined]
    # The three steps ran on three executor processes, which held the limit together.
    started = [
        log.name
        for log in (tmp_path / "logs").glob("executor-*.log")
        if f'"task_id": "{task_id}"' in log.read_text() and "step started" in log.read_text()
    ]
    assert len(started) == 3


async def test_a_429_with_retry_after_slows_every_replica(
    tmp_path: Path, nats_url: str, database_url: str
) -> None:
    """The provider answers one call with 429 and Retry-After: 3. The limiter every
    replica shares holds all of them back until then, not only the one that got it."""
    first: list[float] = []

    def once_429(seen: Seen) -> Reply | None:
        if seen.role == "step" and not first:
            first.append(seen.at)
            return Reply(status=429, headers={"Retry-After": "3"})
        return None

    with scripted_llm(ScriptedLLM(steps=3, hook=once_429)) as script:
        limits = {"AGENTBUS_LLM_RPM": "1000"}
        async with three_executors(tmp_path, script, nats_url, database_url, limits):
            task_id = await submit(nats_url, "back off together", Budget())
            async with watching(nats_url, task_id) as watch:
                await watch.until(lambda ev: any(isinstance(e, TaskCompleted) for e in ev))
    (throttled_at,) = first
    # Calls already on the wire when the 429 came may land just after it; then nothing
    # until Retry-After has passed, on any replica.
    quiet = [s for s in script.seen if throttled_at + 0.5 < s.at < throttled_at + 2.8]
    assert quiet == []
    later = [s for s in script.seen if s.at >= throttled_at + 2.8]
    assert len({s.step_prompt for s in later if s.role == "step"}) >= 2  # several replicas waited
    assert watch.of(TaskCompleted)
