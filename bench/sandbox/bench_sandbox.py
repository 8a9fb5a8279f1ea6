"""Sandbox latency: warm exec vs cold ``docker run``, first exec with and without the
warm pool, and execs per second with 8 tasks at once.

Drives the sandbox service's Docker adapter directly (what a request costs inside the
service; the NATS round trip on top is in bench/orchestration) on the real engine,
with the service's default limits. The cold baseline is ``docker run --rm`` of the
same image with the same hardening flags, measured in the same run. Every exec runs
``python3 -c pass`` through the full wrapper (time limit, process-group kill, output
caps, workspace guard).

An agent thinks (calls its LLM) between runs, so "warm exec" runs one at a time with
THINK_S between them: the sandbox uses that time to start the task's next exec in the
background (``domain.READY_ARGV``). "Warm exec, back to back" has no pause, so it also
pays for starting that exec: it is the floor without idle time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from agentbus.contracts import ExecOutcome, Language, new_id
from agentbus.sandbox.adapters.docker import DockerSandbox
from agentbus.sandbox.domain import SandboxConfig
from agentbus.sandbox.main import Settings

WARM_RUNS = 60
COLD_RUNS = 10
FIRST_RUNS = 12
CONCURRENT_TASKS = 8
THROUGHPUT_SECONDS = 5.0
THINK_S = 0.1
CODE = "pass"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return (time.perf_counter() - started) * 1000


async def exec_ok(sandbox: DockerSandbox, task_id: str) -> None:
    reply = await sandbox.run_code(
        task_id, language=Language.PYTHON, code=CODE, timeout_s=30, env={}, stdin=None
    )
    if reply.outcome is not ExecOutcome.OK:
        raise RuntimeError(f"bench exec failed: {reply}")


async def cold_docker_run(config: SandboxConfig) -> None:
    memory = f"{config.memory_mb}m"
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "--rm", "--network", "none", "--init", "--read-only",
        "--user", "65534:65534", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "--memory", memory,
        "--memory-swap", memory, "--pids-limit", str(config.pids_limit),
        config.image, "python3", "-c", CODE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed: {err.decode()}")


async def first_execs(sandbox: DockerSandbox, pooled: bool) -> list[float]:
    times = []
    for _ in range(FIRST_RUNS):
        if pooled:
            await sandbox.wait_pool_full()
        task = new_id("bench")
        times.append(await timed(lambda task=task: exec_ok(sandbox, task)))  # type: ignore[misc]
        await sandbox.destroy(task)
    return times


async def throughput(sandbox: DockerSandbox) -> tuple[int, float]:
    tasks = [new_id("bench") for _ in range(CONCURRENT_TASKS)]
    await asyncio.gather(*(exec_ok(sandbox, t) for t in tasks))  # containers up first
    done = 0
    stop_at = time.perf_counter() + THROUGHPUT_SECONDS

    async def loop(task: str) -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await exec_ok(sandbox, task)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(t) for t in tasks))
    elapsed = time.perf_counter() - started
    await asyncio.gather(*(sandbox.destroy(t) for t in tasks))
    return done, elapsed


async def bench(root: Path) -> dict[str, float | int | bool]:
    base = Settings(workspace_root=root)
    pooled_config = base.model_copy(update={"idle_ttl_s": 0}).sandbox_config()
    cold_config = base.model_copy(update={"idle_ttl_s": 0, "pool_size": 0}).sandbox_config()

    sandbox = await DockerSandbox.open(pooled_config)
    sandbox.start()
    try:
        await sandbox.wait_pool_full(60)
        warm_task = new_id("bench")
        await exec_ok(sandbox, warm_task)
        for _ in range(3):
            await exec_ok(sandbox, warm_task)
        warm = []
        for _ in range(WARM_RUNS):
            await asyncio.sleep(THINK_S)
            warm.append(await timed(lambda: exec_ok(sandbox, warm_task)))
        busy = [await timed(lambda: exec_ok(sandbox, warm_task)) for _ in range(WARM_RUNS)]
        await sandbox.destroy(warm_task)
        await cold_docker_run(pooled_config)  # image and engine caches warm for both
        cold = [await timed(lambda: cold_docker_run(pooled_config)) for _ in range(COLD_RUNS)]
        first_pool = await first_execs(sandbox, pooled=True)
        done, elapsed = await throughput(sandbox)
    finally:
        await sandbox.close()

    unpooled = await DockerSandbox.open(cold_config)
    try:
        first_cold = await first_execs(unpooled, pooled=False)
    finally:
        await unpooled.close()

    warm_p50, cold_p50 = statistics.median(warm), statistics.median(cold)
    pool_p50, nopool_p50 = statistics.median(first_pool), statistics.median(first_cold)
    return {
        "warm_exec_p50_ms": round(warm_p50, 1),
        "warm_exec_p95_ms": round(pct(warm, 0.95), 1),
        "warm_exec_back_to_back_p50_ms": round(statistics.median(busy), 1),
        "warm_exec_back_to_back_p95_ms": round(pct(busy, 0.95), 1),
        "cold_docker_run_p50_ms": round(cold_p50, 1),
        "cold_docker_run_p95_ms": round(pct(cold, 0.95), 1),
        "warm_vs_cold_p50_x": round(cold_p50 / warm_p50, 1),
        "first_exec_pool_p50_ms": round(pool_p50, 1),
        "first_exec_pool_p95_ms": round(pct(first_pool, 0.95), 1),
        "first_exec_no_pool_p50_ms": round(nopool_p50, 1),
        "first_exec_no_pool_p95_ms": round(pct(first_cold, 0.95), 1),
        "pool_vs_no_pool_p50_x": round(nopool_p50 / pool_p50, 1),
        "concurrent_tasks": CONCURRENT_TASKS,
        "execs_per_s": round(done / elapsed, 1),
        "target_warm_5x_cold": cold_p50 / warm_p50 >= 5,
        "target_first_exec_pool_under_100ms": pool_p50 < 100,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="agentbus-bench-sandbox-"))
    tmp.chmod(0o755)  # the engine bind-mounts workspaces from here
    try:
        figures = asyncio.run(bench(tmp / "workspaces"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f = figures
    print(f"sandbox exec latency (python3 -c {CODE!r}, default limits, adapter in-process)")
    print(f"{'measure':<34}{'n':>5}{'p50':>11}{'p95':>11}")
    rows = [
        (f"warm exec ({THINK_S * 1000:.0f} ms between runs)", WARM_RUNS, "warm_exec"),
        ("warm exec, back to back", WARM_RUNS, "warm_exec_back_to_back"),
        ("cold docker run --rm", COLD_RUNS, "cold_docker_run"),
        ("first exec of a task, with pool", FIRST_RUNS, "first_exec_pool"),
        ("first exec of a task, no pool", FIRST_RUNS, "first_exec_no_pool"),
    ]
    for name, n, key in rows:
        print(f"{name:<34}{n:>5}{f[key + '_p50_ms']:>9.1f}ms{f[key + '_p95_ms']:>9.1f}ms")
    print(f"warm exec vs cold docker run (p50): {f['warm_vs_cold_p50_x']}x  (target >= 5x)")
    pool_x = f["pool_vs_no_pool_p50_x"]
    print(f"first exec, pool vs no pool (p50):  {pool_x}x  (target: pool < 100 ms)")
    print(f"throughput, {CONCURRENT_TASKS} tasks at once: {f['execs_per_s']} execs/s")
    sys.stdout.flush()
    sys.stdout.write(json.dumps({"bench": "sandbox", **figures}) + "\n")


if __name__ == "__main__":
    main()
