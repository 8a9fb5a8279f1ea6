"""Orchestration overhead per step, next to the raw NATS request/reply round trip.

A task is a chain of N steps (s2 after s1, ...). The model is the replay provider, and
each step finishes at once without touching the sandbox, so the time from one
``step.completed`` to the next is orchestration only: the planner taking the event,
updating its state in JetStream KV (compare-and-set), publishing ``step.ready``; an
executor taking it, one replayed LLM turn (microseconds), publishing ``step.completed``.
Timestamps are the events' own ``occurred_at`` (one host clock). Run twice: without
memory, and with the executor's memory recall/save at each step (embedding included).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nats

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import Budget, StepCompleted, TaskCompleted, TaskSubmitted, new_id

CHAIN = 20
TASKS = 5
RTT_SAMPLES = 2000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def chain_transcript(goal: str, n: int) -> dict[str, object]:
    steps = [
        {
            "id": f"s{i}",
            "title": f"step {i}",
            "instructions": "finish at once",
            "depends_on": [f"s{i - 1}"] if i > 1 else [],
        }
        for i in range(1, n + 1)
    ]
    finish = {"tool_calls": [{"name": "finish_step", "arguments": {"result": "ok"}}]}
    conversations: dict[str, object] = {
        "planner/plan": [{"reply": {"content": json.dumps({"steps": steps})}}],
        "planner/answer": [{"reply": {"content": "done"}}],
    }
    for i in range(1, n + 1):
        conversations[f"executor/s{i}"] = [{"reply": finish}]
    return {"goal": goal, "model": "bench", "conversations": conversations}


async def nats_rtt(url: str) -> list[float]:
    nc = await nats.connect(url)

    async def echo(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe("bench.echo", cb=echo, queue="bench")
    samples = []
    payload = b"x" * 256
    for _ in range(RTT_SAMPLES):
        t0 = time.perf_counter()
        await nc.request("bench.echo", payload, timeout=5)
        samples.append((time.perf_counter() - t0) * 1000)
    await nc.close()
    return samples


async def step_overheads(url: str, goal: str) -> list[float]:
    samples: list[float] = []
    async with client.connect(url) as broker:
        for _ in range(TASKS):
            task = TaskSubmitted(task_id=new_id("tsk"), goal=goal, budget=Budget(max_steps=CHAIN))
            await client.submit(broker, task)
            done = [
                e
                async for e in client.follow(broker, task.task_id, timeout=120)
                if isinstance(e, StepCompleted | TaskCompleted)
            ]
            if not isinstance(done[-1], TaskCompleted):
                raise SystemExit(f"bench task failed: {done[-1]!r}")
            times = [e.occurred_at for e in done if isinstance(e, StepCompleted)]
            samples += [(b - a).total_seconds() * 1000 for a, b in itertools.pairwise(times)]
    return samples


async def run(
    use_memory: bool, home: Path, library: Path, goal: str
) -> tuple[list[float], list[float]]:
    env = {
        "AGENTBUS_LLM_PROVIDER": "replay",
        "AGENTBUS_LLM_REPLAY_FILE": str(library),
        "AGENTBUS_EXECUTOR_USE_MEMORY": "true" if use_memory else "false",
        "AGENTBUS_LOG_LEVEL": "WARNING",
    }
    replicas = {"planner": 1, "executor": 1, "sandbox": 1, "memory": 1}
    async with EmbeddedStack(
        home=home, replicas=replicas, extra_env=env, ephemeral_nats=True
    ) as stack:
        url = stack.nats_url or ""
        await step_overheads(url, goal)  # warm-up: imports, JIT caches, first model load
        overheads = await step_overheads(url, goal)
        rtt = await nats_rtt(url)
    return overheads, rtt


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
        home = Path(tmp)
        goal = f"Bench chain of {CHAIN} steps."
        library = home / "chain.json"
        library.write_text(json.dumps(chain_transcript(goal, CHAIN)))
        results = {}
        for use_memory in (False, True):
            overheads, rtt = asyncio.run(
                run(use_memory, home / f"m{int(use_memory)}", library, goal)
            )
            results["with_memory" if use_memory else "orchestration"] = (overheads, rtt)

    rows = []
    figures: dict[str, float | int] = {"chain_steps": CHAIN, "tasks": TASKS}
    for name, (overheads, rtt) in results.items():
        p50, p95 = statistics.median(overheads), pct(overheads, 0.95)
        r50, r95 = statistics.median(rtt), pct(rtt, 0.95)
        rows.append((name, len(overheads), p50, p95, r50, r95, p50 / r50))
        figures |= {
            f"{name}_step_p50_ms": round(p50, 3),
            f"{name}_step_p95_ms": round(p95, 3),
            f"{name}_nats_rtt_p50_ms": round(r50, 4),
            f"{name}_nats_rtt_p95_ms": round(r95, 4),
            f"{name}_steps_measured": len(overheads),
        }
    print("orchestration overhead per step (replayed LLM, no sandbox), vs raw NATS request/reply")
    heads = ("steps", "step p50", "step p95", "rtt p50", "rtt p95", "p50/rtt")
    widths = (7, 11, 11, 10, 10, 9)
    print(f"{'run':<15}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)))
    for name, n, p50, p95, r50, r95, ratio in rows:
        print(f"{name:<15}{n:>7}{p50:>9.2f}ms{p95:>9.2f}ms{r50:>8.3f}ms{r95:>8.3f}ms{ratio:>8.0f}x")
    print("targets: orchestration step p50 < 10 ms, p95 < 50 ms")
    figures["target_met"] = int(
        figures["orchestration_step_p50_ms"] < 10 and figures["orchestration_step_p95_ms"] < 50
    )
    sys.stdout.write(json.dumps({"bench": "orchestration", **figures}) + "\n")


if __name__ == "__main__":
    main()
