"""Helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
from faststream.nats import NatsBroker
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agentbus.cli import client
from agentbus.cli.stack import EmbeddedStack, NatsServer
from agentbus.contracts import (
    Budget,
    Event,
    Language,
    SandboxExecReply,
    TaskSubmitted,
    new_id,
    subjects,
)
from agentbus.sandbox import Settings as SandboxSettings
from agentbus.sandbox.adapters.docker import DockerSandbox

T = TypeVar("T")


def start_nats(root: Path, name: str) -> NatsServer:
    """A nats-server with a JetStream store of its own (about 0.1 s to start)."""
    return NatsServer(root / f"nats-{name}", log_file=root / f"nats-{name}.log").start()


async def eventually(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 30.0
) -> T:
    """Poll ``fetch`` until ``done`` holds, failing with the last value after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not done within {timeout:g}s; last value: {value!r}")
        await asyncio.sleep(0.05)


async def stored(js: JetStreamContext, subject_filter: str, quiet_s: float = 0.5) -> list[bytes]:
    """Every stored message on ``subject_filter``, oldest first: read until none comes
    for ``quiet_s``."""
    sub = await js.subscribe(
        subject_filter, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    found = []
    try:
        while True:
            found.append((await sub.next_msg(timeout=quiet_s)).data)
    except nats.errors.TimeoutError:
        return found
    finally:
        await sub.unsubscribe()


async def dead_letters(js: JetStreamContext, service: str, subject: str) -> list[dict[str, Any]]:
    """Letters in ``service``'s dead-letter subject about messages published on ``subject``."""
    letters = [json.loads(data) for data in await stored(js, subjects.dlq_subject(service))]
    return [letter for letter in letters if letter["subject"] == subject]


async def run_task(broker: NatsBroker, goal: str, budget: Budget | None = None) -> list[Event]:
    """Submit a task and collect its events up to the terminal one."""
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal, budget=budget or Budget())
    await client.submit(broker, task)
    return [e async for e in client.follow(broker, task.task_id, timeout=120)]


@contextlib.asynccontextmanager
async def replay_stack(
    home: Path,
    replay: Path,
    *,
    nats_url: str,
    database_url: str,
    replicas: Mapping[str, int] | None = None,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[EmbeddedStack]:
    """All four services as processes on the test session's servers, the replay
    provider (a transcript or a directory of them) standing in for the LLM."""
    async with EmbeddedStack(
        home=home,
        replicas=replicas or dict.fromkeys(subjects.SERVICES, 1),
        extra_env={
            "AGENTBUS_LLM_PROVIDER": "replay",
            "AGENTBUS_LLM_REPLAY_FILE": str(replay),
            **(env or {}),
        },
        nats_url=nats_url,
        database_url=database_url,
    ) as running:
        yield running


@contextlib.asynccontextmanager
async def sandbox_on_own_root(
    settings: SandboxSettings, root: Path, **update: Any
) -> AsyncIterator[DockerSandbox]:
    """A started DockerSandbox (pool and reaper running) on a workspace root of its own,
    so its reaper sees nothing of the module's sandbox service; closed afterwards."""
    root.mkdir()
    root.chmod(0o755)
    config = settings.model_copy(update={"workspace_root": root, **update}).sandbox_config()
    sandbox = await DockerSandbox.open(config)
    sandbox.start()
    try:
        yield sandbox
    finally:
        await sandbox.close()


async def run_direct(
    sandbox: DockerSandbox,
    task_id: str,
    code: str,
    *,
    language: Language = Language.PYTHON,
    timeout_s: float = 20,
) -> SandboxExecReply:
    """Run code on a DockerSandbox directly (no service in between), no env or stdin."""
    return await sandbox.run_code(
        task_id, language=language, code=code, timeout_s=timeout_s, env={}, stdin=None
    )
