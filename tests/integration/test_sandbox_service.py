"""The sandbox service against a real nats-server and the real Docker engine.

The service runs in-process (its real FastStream app, started as in production); the
test talks to it over NATS request/reply from a second broker, as the executor does.
Every test uses its own task ids; every container the module creates carries its
workspace root in a label, and the module removes them all at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker

from agentbus.cli.client import connect
from agentbus.contracts import (
    ExecOutcome,
    Language,
    Reply,
    SandboxDestroyReply,
    SandboxDestroyRequest,
    SandboxExecReply,
    SandboxExecRequest,
    SandboxListFilesReply,
    SandboxListFilesRequest,
    SandboxReadFileReply,
    SandboxReadFileRequest,
    SandboxWriteFileReply,
    SandboxWriteFileRequest,
    TaskCompleted,
    new_id,
    subjects,
)
from agentbus.core.bus import publish_event, rpc
from agentbus.core.settings import BusSettings
from agentbus.sandbox import Settings, create_app
from agentbus.sandbox.domain import SandboxUnavailable

pytestmark = pytest.mark.integration

IMAGE = "agentbus-sandbox:latest"
LABEL_TASK = "agentbus.task_id"
LABEL_ROOT = "agentbus.workspace_root"
R = TypeVar("R", bound=Reply)


@pytest.fixture(scope="module")
def workspace_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("sandbox-workspaces").resolve()
    root.chmod(0o755)  # the daemon bind-mounts from here; contents belong to uid 65534
    yield root


@pytest.fixture(scope="module")
async def docker(workspace_root: Path) -> AsyncIterator[aiodocker.Docker]:
    """The Docker engine, or a loud failure saying how to get one (CI starts it)."""
    try:
        client = aiodocker.Docker()
        await client.version()
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing here
        pytest.fail(
            f"the Docker engine is not reachable ({exc!r}): the sandbox tests need it. "
            "Start it with `make docker` (infra/scripts/ensure-docker.sh), then "
            "`make sandbox-image`.",
            pytrace=False,
        )
    try:
        await client.images.inspect(IMAGE)
    except aiodocker.DockerError:
        await client.close()
        pytest.fail(f"image {IMAGE} is missing: run `make sandbox-image`", pytrace=False)
    yield client
    # Remove every container this module's sandbox made, whatever the tests did.
    for container in await client.containers.list(
        all=True, filters={"label": [f"{LABEL_ROOT}={workspace_root}"]}
    ):
        await container.delete(force=True)
    await client.close()


@pytest.fixture(scope="module")
def settings(nats_url: str, workspace_root: Path) -> Settings:
    return Settings(
        bus=BusSettings(nats_url=nats_url),
        workspace_root=workspace_root,
        memory_mb=256,
        max_output_bytes=64 * 1024,
    )


async def plant_leftover(docker: aiodocker.Docker, workspace_root: Path, *, running: bool) -> str:
    """A container as an earlier run of the sandbox would have left it."""
    container = await docker.containers.create(
        {
            "Image": IMAGE,
            "Cmd": ["sleep", "infinity"],
            "Labels": {
                "agentbus.role": "sandbox",
                LABEL_TASK: new_id("tsk"),
                LABEL_ROOT: str(workspace_root),
            },
            "HostConfig": {"NetworkMode": "none"},
        }
    )
    if running:
        await container.start()
    container_id: str = container.id
    return container_id


async def exists(docker: aiodocker.Docker, container_id: str) -> bool:
    return bool(await docker.containers.list(all=True, filters={"id": [container_id]}))


@pytest.fixture(scope="module")
async def leftover(docker: aiodocker.Docker, workspace_root: Path) -> str:
    return await plant_leftover(docker, workspace_root, running=True)


@pytest.fixture(scope="module")
async def service(
    settings: Settings, docker: aiodocker.Docker, leftover: str
) -> AsyncIterator[FastStream]:
    app = create_app(settings)
    async with TestApp(app):
        yield app


@pytest.fixture(scope="module")
async def client(nats_url: str, service: FastStream) -> AsyncIterator[NatsBroker]:
    async with connect(nats_url) as broker:
        yield broker


async def call(
    client: NatsBroker, subject: str, request: Any, reply_type: type[R], timeout: float = 30
) -> R:
    return await rpc(client, subject, request, reply_type, timeout=timeout)


async def run(
    client: NatsBroker,
    task_id: str,
    code: str,
    *,
    language: Language = Language.PYTHON,
    timeout_s: float = 20,
    **extra: Any,
) -> SandboxExecReply:
    request = SandboxExecRequest(
        task_id=task_id, language=language, code=code, timeout_s=timeout_s, **extra
    )
    return await call(client, subjects.SANDBOX_EXEC, request, SandboxExecReply, timeout_s + 30)


async def task_containers(docker: aiodocker.Docker, task_id: str) -> list[Any]:
    """The task's containers, by name: one claimed from the warm pool has no task label."""
    found: list[Any] = await docker.containers.list(
        all=True, filters={"name": [f"^/agentbus-sbx-{task_id}$"]}
    )
    return found


# --- running code -------------------------------------------------------------------------


async def test_python_prints_and_exits_zero(client: NatsBroker) -> None:
    reply = await run(client, new_id("tsk"), "import sys; print('hello', sys.version_info[0])")
    assert reply.ok, reply.error
    assert reply.exit_code == 0
    assert reply.outcome is ExecOutcome.OK
    assert reply.stdout == "hello 3\n"
    assert reply.stderr == ""
    assert reply.duration_ms > 0


async def test_a_failing_script_reports_its_exit_code_and_stderr(client: NatsBroker) -> None:
    reply = await run(
        client, new_id("tsk"), "import sys\nprint('oops', file=sys.stderr)\nsys.exit(3)"
    )
    assert reply.ok
    assert reply.exit_code == 3
    assert reply.outcome is ExecOutcome.ERROR
    assert reply.stderr == "oops\n"
    crash = await run(client, new_id("tsk"), "1/0")
    assert crash.exit_code == 1
    assert "ZeroDivisionError" in crash.stderr


async def test_bash_env_and_stdin(client: NatsBroker) -> None:
    task = new_id("tsk")
    reply = await run(
        client, task, 'echo "$GREETING $(id -u)"', language=Language.BASH, env={"GREETING": "hi"}
    )
    assert reply.stdout == "hi 65534\n"  # never root
    piped = await run(client, task, "import sys; print(sys.stdin.read()[::-1])", stdin="abc")
    assert piped.stdout == "cba\n"
    ignored = await run(client, task, "print('did not read stdin')", stdin="x" * 500_000)
    assert ignored.outcome is ExecOutcome.OK


async def test_time_limits_above_the_maximum_are_lowered_and_said_so(
    client: NatsBroker,
) -> None:
    reply = await run(client, new_id("tsk"), "print(1)", timeout_s=3000)
    assert reply.outcome is ExecOutcome.OK
    assert "lowered from 3000s to the maximum of 600s" in reply.stderr


# --- files --------------------------------------------------------------------------------


async def test_files_are_shared_between_calls_and_kept_on_the_host(
    client: NatsBroker, docker: aiodocker.Docker, workspace_root: Path
) -> None:
    task = new_id("tsk")
    written = await call(
        client,
        subjects.SANDBOX_WRITE_FILE,
        SandboxWriteFileRequest(task_id=task, path="in/data.txt", content="3\n4\n"),
        SandboxWriteFileReply,
    )
    assert written.ok, written.error
    assert (written.path, written.size) == ("in/data.txt", 4)

    code = (
        "nums = [int(x) for x in open('in/data.txt')]\n"
        "open('out.txt', 'w').write(str(sum(nums)))\n"
        "open('/tmp/marker', 'w').write('same container')\n"
    )
    assert (await run(client, task, code)).exit_code == 0
    again = await run(client, task, "print(open('/tmp/marker').read())")
    assert again.stdout == "same container\n"  # /tmp is the container's: it was reused
    assert len(await task_containers(docker, task)) == 1

    read = await call(
        client,
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id=task, path="/workspace/out.txt"),
        SandboxReadFileReply,
    )
    assert read.ok, read.error
    assert (read.path, read.content, read.size, read.truncated) == ("out.txt", "7", 1, False)

    listed = await call(
        client,
        subjects.SANDBOX_LIST_FILES,
        SandboxListFilesRequest(task_id=task),
        SandboxListFilesReply,
    )
    assert [(f.path, f.size) for f in listed.files] == [("in/data.txt", 4), ("out.txt", 1)]

    host = workspace_root / task
    assert (host / "in" / "data.txt").read_text() == "3\n4\n"
    assert (host / "out.txt").read_text() == "7"
    assert (host / "out.txt").stat().st_uid == 65534


async def test_read_file_honours_max_bytes(client: NatsBroker) -> None:
    task = new_id("tsk")
    await run(client, task, "open('big.txt', 'w').write('abcdef' * 1000)")
    read = await call(
        client,
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id=task, path="big.txt", max_bytes=10),
        SandboxReadFileReply,
    )
    assert (read.content, read.size, read.truncated) == ("abcdefabcd", 6000, True)


async def test_a_failed_write_answers_promptly(client: NatsBroker) -> None:
    task = new_id("tsk")
    await run(client, task, "open('afile', 'w').close()")
    started = time.monotonic()
    written = await call(
        client,
        subjects.SANDBOX_WRITE_FILE,
        SandboxWriteFileRequest(task_id=task, path="afile/x.txt", content="y" * 400_000),
        SandboxWriteFileReply,
    )
    assert not written.ok
    assert written.error is not None
    assert "could not write afile/x.txt" in written.error
    assert time.monotonic() - started < 10  # not left to the 40 s safety net


async def test_missing_files_are_a_clear_error(client: NatsBroker) -> None:
    read = await call(
        client,
        subjects.SANDBOX_READ_FILE,
        SandboxReadFileRequest(task_id=new_id("tsk"), path="nope.txt"),
        SandboxReadFileReply,
    )
    assert not read.ok
    assert read.error == "could not read nope.txt: no such file: nope.txt"


# --- life cycle ---------------------------------------------------------------------------


async def test_destroy_removes_the_container_and_keeps_the_workspace(
    client: NatsBroker, docker: aiodocker.Docker, workspace_root: Path
) -> None:
    task = new_id("tsk")
    await run(client, task, "open('result.txt', 'w').write('kept')")
    assert len(await task_containers(docker, task)) == 1
    reply = await call(
        client, subjects.SANDBOX_DESTROY, SandboxDestroyRequest(task_id=task), SandboxDestroyReply
    )
    assert reply.ok
    assert reply.destroyed
    assert await task_containers(docker, task) == []
    assert (workspace_root / task / "result.txt").read_text() == "kept"
    again = await call(
        client, subjects.SANDBOX_DESTROY, SandboxDestroyRequest(task_id=task), SandboxDestroyReply
    )
    assert again.ok
    assert not again.destroyed


async def test_a_completed_task_loses_its_container(
    client: NatsBroker, docker: aiodocker.Docker
) -> None:
    task = new_id("tsk")
    await run(client, task, "print(1)")
    assert len(await task_containers(docker, task)) == 1
    await publish_event(client, TaskCompleted(task_id=task, answer="done"))
    deadline = time.monotonic() + 30
    while await task_containers(docker, task):
        assert time.monotonic() < deadline, "the container outlived its task"
        await asyncio.sleep(0.2)


async def test_concurrent_first_calls_share_one_container(
    client: NatsBroker, docker: aiodocker.Docker
) -> None:
    task = new_id("tsk")
    replies = await asyncio.gather(*(run(client, task, f"print({i})") for i in range(5)))
    assert sorted(r.stdout for r in replies) == [f"{i}\n" for i in range(5)]
    assert len(await task_containers(docker, task)) == 1


async def test_a_malformed_request_gets_an_error_reply_not_silence(client: NatsBroker) -> None:
    for payload in ({"task_id": "../../etc", "code": "print(1)"}, {"code": 42}, "not json"):
        msg = await client.request(payload, subjects.SANDBOX_EXEC, timeout=10)
        reply = SandboxExecReply.model_validate_json(msg.body)
        assert not reply.ok
        assert reply.error


async def test_start_up_removes_leftovers_of_earlier_runs(
    docker: aiodocker.Docker, leftover: str, service: FastStream
) -> None:
    assert not await exists(docker, leftover)


async def test_a_second_replica_spares_running_sandboxes_of_the_first(
    settings: Settings, docker: aiodocker.Docker, workspace_root: Path, client: NatsBroker
) -> None:
    stopped = await plant_leftover(docker, workspace_root, running=False)
    in_use = await plant_leftover(docker, workspace_root, running=True)
    async with TestApp(create_app(settings)):
        assert not await exists(docker, stopped)
        assert await exists(docker, in_use)  # the first replica may be using it
        replies = await asyncio.gather(*(run(client, new_id("tsk"), "print(2)") for _ in range(4)))
        assert all(r.stdout == "2\n" for r in replies)


async def test_start_up_fails_clearly_without_the_image(
    settings: Settings, service: FastStream
) -> None:
    broken = create_app(settings.model_copy(update={"image": "agentbus-sandbox:no-such-tag"}))
    try:
        with pytest.raises(SandboxUnavailable, match="make sandbox-image"):
            await broken.start()
    finally:
        assert broken.broker is not None
        await broken.broker.stop()


# --- warm pool ----------------------------------------------------------------------------


async def test_first_calls_take_pool_containers_never_shared(
    client: NatsBroker, docker: aiodocker.Docker, workspace_root: Path
) -> None:
    async def pool() -> list[Any]:
        found: list[Any] = await docker.containers.list(
            filters={"name": ["^/agentbus-pool-"], "label": [f"{LABEL_ROOT}={workspace_root}"]}
        )
        return found

    deadline = time.monotonic() + 20
    while len(await pool()) < 2:  # the default pool_size: full again after earlier tests
        assert time.monotonic() < deadline, "the pool never filled"
        await asyncio.sleep(0.1)
    tasks = [new_id("tsk") for _ in range(6)]  # more than the pool holds: some start cold
    replies = await asyncio.gather(
        *(
            run(client, t, f"open('me.txt', 'w').write('{t}'); print(open('me.txt').read())")
            for t in tasks
        )
    )
    assert [r.stdout for r in replies] == [f"{t}\n" for t in tasks]
    ids = set()
    pooled = 0
    for task in tasks:
        (container,) = await task_containers(docker, task)
        info = await container.show()
        ids.add(info["Id"])
        pooled += LABEL_TASK not in info["Config"]["Labels"]  # claimed from the pool
        host = info["HostConfig"]
        assert (host["NetworkMode"], host["ReadonlyRootfs"], host["CapDrop"]) == (
            "none",
            True,
            ["ALL"],
        )
        assert (workspace_root / task / "me.txt").read_text() == task  # artifacts on host
    assert len(ids) == len(tasks)  # one container per task
    # The engine lists a pool container as running a moment before the refill gets the
    # start reply and puts it in the pool, so a claim can find one of the two not yet in.
    assert pooled >= 1
    # The pool refills in the background: fresh pool containers appear.
    deadline = time.monotonic() + 20
    while not await pool():
        assert time.monotonic() < deadline, "the pool was not refilled"
        await asyncio.sleep(0.1)
