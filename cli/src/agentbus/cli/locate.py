"""Where the CLI finds the platform: ``AGENTBUS_NATS_URL`` if set; else a running
``agentbus up`` (announced in ``AGENTBUS_HOME``); else the embedded stack it starts for
one command."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

from .stack import EmbeddedStack


def agentbus_home() -> Path:
    return Path(os.environ.get("AGENTBUS_HOME") or Path.home() / ".agentbus").expanduser()


def external_nats_url() -> str | None:
    return os.environ.get("AGENTBUS_NATS_URL") or os.environ.get("NATS_URL") or None


def external_database_url() -> str | None:
    """A configured Postgres the embedded stack's memory uses instead of its own."""
    return os.environ.get("AGENTBUS_DATABASE_URL") or os.environ.get("DATABASE_URL") or None


def stack_file(home: Path) -> Path:
    return home / "stack.json"


def run_file(home: Path, task_id: str) -> Path:
    return home / "runs" / f"{task_id}.json"


@contextlib.contextmanager
def announced(path: Path, nats_url: str) -> Iterator[None]:
    """While this process runs an embedded stack, say where (``path``), so commands in
    another terminal (``agentbus run``/``approve``/``cancel``) can reach it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": os.getpid(), "nats_url": nats_url}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def live_stack(path: Path) -> str | None:
    """The NATS URL announced in ``path`` if the process that announced it still runs."""
    try:
        info = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(info["nats_url"])


def running_up_stack(home: Path) -> str | None:
    """The NATS URL of a live ``agentbus up`` on this machine, if any."""
    return live_stack(stack_file(home))


@contextlib.asynccontextmanager
async def bus(
    home: Path, replicas: Mapping[str, int], extra_env: Mapping[str, str], say: bool = True
) -> AsyncIterator[tuple[str, bool]]:
    """Yield (nats_url, embedded) for a command, starting the embedded stack if needed."""
    url = external_nats_url() or running_up_stack(home)
    if url:
        yield url, False
        return
    if say:
        print(f"starting the embedded stack in {home} ...", file=sys.stderr)
    started = time.monotonic()
    stack = EmbeddedStack(
        home=home,
        replicas=replicas,
        extra_env=extra_env,
        ephemeral_nats=True,
        database_url=external_database_url(),
    )
    async with stack:
        if say:
            print(f"stack ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        yield stack.nats_url or "", True
