"""The gateway's event delivery: how long an event takes from its publish to an SSE
client, next to the raw NATS round trip (publish with ack, an ordered consumer) in the
same run; the time from ``POST /v1/tasks`` to the stream's first event; and how many
concurrent SSE clients one replica serves at 1 event/s each before the p95 delivery
passes 100 ms, with the gateway's memory per open stream.

It runs an embedded NATS and Postgres, the memory service (for API keys) and one
gateway replica, all on loopback; the clients run in this process, on the same CPUs as
the gateway, so the client-side parsing is counted in the figures too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agentbus.cli import client
from agentbus.cli.keys import new_key
from agentbus.cli.local_gateway import start_gateway
from agentbus.cli.stack import EmbeddedStack
from agentbus.contracts import (
    KeyCreateReply,
    KeyCreateRequest,
    StepToolCalled,
    TaskSubmitted,
    new_id,
    subjects,
)
from agentbus.core.bus import jetstream, publish_event, rpc

TENANT = "bench"
P95_LIMIT_MS = 100.0
LIVE_WAIT_S = 60.0  # for every stream of a sweep step to have sent its first event


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def frames(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    frame: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "id" in frame:
                yield frame
            frame = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            frame[name] = value


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def progress(task_id: str, i: int) -> StepToolCalled:
    return StepToolCalled(task_id=task_id, step_id="s1", tool="run_python", summary=str(i))


async def raw_nats(broker: NatsBroker, js: JetStreamContext, n: int) -> list[float]:
    """Publish with ack, received by an ordered consumer in this process: the floor."""
    task_id = new_id("tsk")
    sub = await js.subscribe(
        subjects.task_filter(task_id),
        stream=subjects.EVENTS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    out = []
    try:
        for i in range(n):
            started = time.perf_counter()
            await publish_event(broker, progress(task_id, i))
            await asyncio.wait_for(sub.next_msg(timeout=5), 5)
            out.append((time.perf_counter() - started) * 1000)
    finally:
        await sub.unsubscribe()
    return out


async def submitted(broker: NatsBroker) -> str:
    event = TaskSubmitted(task_id=new_id("tsk"), goal="bench", tenant=TENANT)
    await publish_event(broker, event)
    return event.task_id


async def through_sse(http: httpx.AsyncClient, broker: NatsBroker, n: int) -> list[float]:
    """The same publishes, received by an SSE client of the gateway."""
    task_id = await submitted(broker)
    out: list[float] = []
    async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
        stream = frames(response)
        first = await anext(stream)  # task.submitted: the stream is live
        assert first["event"] == "task.submitted"
        for i in range(n):
            started = time.perf_counter()
            await publish_event(broker, progress(task_id, i))
            frame = await asyncio.wait_for(anext(stream), 5)
            assert json.loads(frame["data"])["summary"] == str(i)
            out.append((time.perf_counter() - started) * 1000)
    return out


async def post_to_first_event(http: httpx.AsyncClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        created = (await http.post("/v1/tasks", json={"goal": "bench"})).json()
        async with http.stream("GET", created["events_url"]) as response:
            await asyncio.wait_for(anext(frames(response)), 5)
        out.append((time.perf_counter() - started) * 1000)
    return out


async def many_clients(
    url: str, key: str, broker: NatsBroker, *, clients: int, seconds: float, gateway_pid: int
) -> tuple[list[float], float, int]:
    """``clients`` streams, one task each, one event per second per task. Returns the
    delivery times, the gateway's RSS growth per open stream (KiB) and lost events."""
    tasks = [await submitted(broker) for _ in range(clients)]
    sent: dict[str, float] = {}
    delays: list[float] = []
    expected = 0
    received = 0
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    headers = {"Authorization": f"Bearer {key}"}
    before = rss_kib(gateway_pid)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as http:
        live = [asyncio.Event() for _ in tasks]

        async def follow(index: int, task_id: str) -> None:
            nonlocal received
            async with http.stream("GET", f"/v1/tasks/{task_id}/events") as response:
                async for frame in frames(response):
                    if frame["event"] == "task.submitted":
                        live[index].set()
                        continue
                    key_ = json.loads(frame["data"])["event_id"]
                    delays.append((time.perf_counter() - sent[key_]) * 1000)
                    received += 1

        readers = [asyncio.create_task(follow(i, t)) for i, t in enumerate(tasks)]
        try:
            async with asyncio.timeout(LIVE_WAIT_S):
                await asyncio.gather(*(e.wait() for e in live))
        except TimeoutError:
            up = sum(e.is_set() for e in live)
            print(f"  {clients} streams: only {up} were live after {LIVE_WAIT_S:g} s")
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            return [], 0.0, clients - up
        per_stream = (rss_kib(gateway_pid) - before) / clients
        for second in range(int(seconds)):
            tick = time.perf_counter()
            for task_id in tasks:  # spread the task's events over the second
                event = progress(task_id, second)
                sent[event.event_id] = time.perf_counter()
                await publish_event(broker, event)
                expected += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
        await asyncio.sleep(1.0)  # the last ones in flight
        for reader in readers:
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*readers, return_exceptions=True)
    return delays, per_stream, expected - received


async def run(args: argparse.Namespace) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="agentbus-bench-gateway-"))
    async with EmbeddedStack(home=home, replicas={"memory": 1}, ephemeral_nats=True) as stack:
        nats_url = stack.nats_url or ""
        async with client.connect(nats_url) as broker:
            key, key_hash, prefix = new_key()
            request = KeyCreateRequest(tenant=TENANT, key_hash=key_hash, prefix=prefix)
            reply = await rpc(
                broker, subjects.MEMORY_KEYS_CREATE, request, KeyCreateReply, timeout=10
            )
            assert reply.ok, reply.error
            env = stack.services.env if stack.services else {}
            gateway = await start_gateway(env, home, nats_url)
            try:
                url = gateway.processes[0].url
                pid = gateway.processes[0].proc.pid
                headers = {"Authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
                    raw = await raw_nats(broker, jetstream(broker), args.events)
                    sse = await through_sse(http, broker, args.events)
                    first = await post_to_first_event(http, args.posts)
                sweep = []
                for count in args.clients:
                    delays, per_stream, lost = await many_clients(
                        url, key, broker, clients=count, seconds=args.seconds, gateway_pid=pid
                    )
                    sweep.append((count, delays, per_stream, lost))
            finally:
                gateway.stop()
    print(f"event delivery, {args.events} events one at a time (ms)")
    print(f"{'path':<34} {'p50':>8} {'p95':>8} {'max':>8}")
    for name, values in (
        ("raw NATS: publish -> consumer", raw),
        ("gateway: publish -> SSE client", sse),
    ):
        print(f"{name:<34} {pct(values, 0.5):>8.2f} {pct(values, 0.95):>8.2f} {max(values):>8.2f}")
    print(
        f"POST /v1/tasks -> first SSE event, {args.posts} tasks (ms): "
        f"p50 {pct(first, 0.5):.2f}  p95 {pct(first, 0.95):.2f}"
    )
    print(f"\nconcurrent SSE clients, 1 event/s each, {args.seconds:g} s (ms)")
    print(f"{'clients':>8} {'events':>8} {'p50':>8} {'p95':>8} {'lost':>6} {'KiB/stream':>11}")
    best = 0
    for count, delays, per_stream, lost in sweep:
        p95 = pct(delays, 0.95) if delays else float("inf")
        print(
            f"{count:>8} {len(delays):>8} {pct(delays, 0.5) if delays else 0:>8.2f} "
            f"{p95:>8.2f} {lost:>6} {per_stream:>11.1f}"
        )
        if delays and p95 <= P95_LIMIT_MS and lost == 0:
            best = max(best, count)
    return {
        "bench": "gateway",
        "raw_nats_p50_ms": round(pct(raw, 0.5), 3),
        "raw_nats_p95_ms": round(pct(raw, 0.95), 3),
        "sse_p50_ms": round(pct(sse, 0.5), 3),
        "sse_p95_ms": round(pct(sse, 0.95), 3),
        "post_to_first_event_p50_ms": round(pct(first, 0.5), 3),
        "post_to_first_event_p95_ms": round(pct(first, 0.95), 3),
        "clients_within_p95_100ms": best,
        "sweep": [
            {
                "clients": c,
                "p95_ms": round(pct(d, 0.95), 3) if d else None,
                "lost": lost,
                "rss_kib_per_stream": round(per, 1),
            }
            for c, d, per, lost in sweep
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--posts", type=int, default=30)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--seconds", type=float, default=5)
    figures = asyncio.run(run(parser.parse_args()))
    print(json.dumps(figures))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
