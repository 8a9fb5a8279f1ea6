"""The gateway as a process in front of the four real services (nats-server with
JetStream, Postgres + pgvector, Docker, the replay provider standing in for the LLM):
a task submitted over HTTP, followed over SSE to its end, resumed with Last-Event-ID,
and fenced off from another tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentbus.cli import client
from agentbus.cli.keys import new_key
from agentbus.cli.stack import EmbeddedStack, free_port
from agentbus.contracts import KeyCreateReply, KeyCreateRequest, subjects
from agentbus.core.bus import rpc
from tests.support import eventually, replay_stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PRIMES = ROOT / "examples" / "primes" / "transcript.json"
GOAL = json.loads(PRIMES.read_text())["goal"]


@dataclass
class Gateway:
    url: str
    keys: dict[str, str]  # tenant -> key

    def client(self, tenant: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
async def stack(tmp_root: Path, nats_url: str, database_url: str) -> AsyncIterator[EmbeddedStack]:
    async with replay_stack(
        tmp_root / "gateway-home", PRIMES, nats_url=nats_url, database_url=database_url
    ) as running:
        yield running


@pytest.fixture(scope="module")
def gateway_process(stack: EmbeddedStack, tmp_root: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_root / "gateway.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentbus.gateway"],
        env={
            **os.environ,
            "AGENTBUS_NATS_URL": stack.nats_url or "",
            "AGENTBUS_GATEWAY_PORT": str(port),
            "AGENTBUS_GATEWAY_KEY_CACHE_S": "0",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
async def gateway(stack: EmbeddedStack, gateway_process: str) -> Gateway:
    keys: dict[str, str] = {}
    async with client.connect(stack.nats_url or "") as broker:
        for tenant in ("acme", "globex"):
            key, key_hash, prefix = new_key()
            request = KeyCreateRequest(tenant=tenant, key_hash=key_hash, prefix=prefix)
            reply = await rpc(
                broker, subjects.MEMORY_KEYS_CREATE, request, KeyCreateReply, timeout=10
            )
            assert reply.ok, reply.error
            keys[tenant] = key

    async def ready() -> bool:
        try:
            async with httpx.AsyncClient() as http:
                return (await http.get(f"{gateway_process}/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(ready, bool, timeout=30)
    return Gateway(gateway_process, keys)


async def events(
    http: httpx.AsyncClient, task_id: str, after: str | None = None
) -> list[dict[str, str]]:
    """Every SSE frame with an id, until the server ends the stream."""
    headers = {"Last-Event-ID": after} if after else {}
    frames: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    async with http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                if "id" in frame:
                    frames.append(frame)
                frame = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                frame[name] = value
    return frames


async def test_a_task_over_http_streams_to_its_end_and_resumes_exactly(gateway: Gateway) -> None:
    async with gateway.client("acme") as http:
        created = await http.post("/v1/tasks", json={"goal": GOAL})
        assert created.status_code == 201, created.text
        task_id = created.json()["task_id"]

        frames = await events(http, task_id)
        kinds = [f["event"] for f in frames]
        assert kinds[0] == "task.submitted" and kinds[-1] == "task.completed"
        ids = [int(f["id"]) for f in frames]
        assert ids == sorted(set(ids))  # stream order, nothing twice
        assert json.loads(frames[0]["data"])["tenant"] == "acme"

        # Reconnecting after the third event gets exactly the rest, nothing repeated.
        again = await events(http, task_id, after=frames[2]["id"])
        assert [f["id"] for f in again] == [f["id"] for f in frames[3:]]
        # After the terminal event there is nothing left: the stream ends at once.
        assert await events(http, task_id, after=frames[-1]["id"]) == []

        async def detail_now() -> dict[str, Any]:
            body: dict[str, Any] = (await http.get(f"/v1/tasks/{task_id}")).json()
            return body

        detail = await eventually(detail_now, lambda d: d["task"]["status"] == "completed")
        assert "639" in detail["task"]["answer"]
        assert [t["task_id"] for t in (await http.get("/v1/tasks")).json()["tasks"]] == [task_id]

    async with gateway.client("globex") as other:
        for path in (f"/v1/tasks/{task_id}", f"/v1/tasks/{task_id}/events"):
            response = await other.get(path)
            assert response.status_code == 404, path
            assert response.headers["content-type"] == "application/problem+json"
        assert (await other.post(f"/v1/tasks/{task_id}/cancel")).status_code == 404
        assert (await other.get("/v1/tasks")).json()["tasks"] == []

    async with gateway.client(None) as anonymous:
        assert (await anonymous.get("/v1/tasks")).status_code == 401
