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
from agentbus.sandbox.adapters import cgroup
from agentbus.sandbox.adapters.docker import DockerSandbox
from agentbus.sandbox.domain import SandboxUnavailable
from tests.support import run_direct, sandbox_on_own_root

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


# --- CPU time -----------------------------------------------------------------------------

BUSY_1S = "import time\nwhile time.process_time() < 1: pass"  # 1 s of CPU, however slow


async def test_a_run_reports_the_cpu_seconds_it_used(client: NatsBroker) -> None:
    task = new_id("tsk")
    busy = await run(client, task, BUSY_1S)
    assert busy.outcome is ExecOutcome.OK
    assert 0.7 <= busy.cpu_seconds <= 1.5, busy
    sleeping = await run(client, task, "sleep 1", language=Language.BASH)
    assert sleeping.outcome is ExecOutcome.OK
    assert sleeping.cpu_seconds < 0.2, sleeping
    # Work done in child processes is the run's, too.
    forked = await run(
        client, task, f"import subprocess; subprocess.run(['python3', '-c', {BUSY_1S!r}])"
    )
    assert 0.7 <= forked.cpu_seconds <= 1.5, forked


async def test_a_run_killed_at_its_limit_reports_the_cpu_it_used(client: NatsBroker) -> None:
    reply = await run(client, new_id("tsk"), "while True: pass", timeout_s=2)
    assert reply.outcome is ExecOutcome.TIMEOUT
    assert reply.cpu_seconds > 0.5, reply


async def test_cpu_seconds_are_measured_without_sight_of_the_host_cgroups(
    settings: Settings, docker: aiodocker.Docker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service that cannot see the engine's cgroups (it runs in a container of its
    own) reads the counter from inside the sandbox instead."""
    looked: list[str] = []

    def not_visible(container_id: str, pid: int) -> None:
        looked.append(container_id)

    monkeypatch.setattr(cgroup, "locate", not_visible)
    sandbox = await DockerSandbox.open(
        settings.model_copy(update={"pool_size": 0}).sandbox_config()
    )
    task = new_id("tsk")
    try:
        busy = await run_direct(sandbox, task, BUSY_1S)
        sleeping = await run_direct(sandbox, task, "sleep 1", language=Language.BASH)
    finally:
        await sandbox.destroy(task)
        await sandbox.close()
    assert looked  # the host was asked, and could not tell
    assert 0.7 <= busy.cpu_seconds <= 1.5, busy
    assert sleeping.cpu_seconds < 0.2, sleeping


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


async def test_a_run_whose_sandbox_is_removed_says_so_not_out_of_memory(
    client: NatsBroker, docker: aiodocker.Docker
) -> None:
    """A cancelled task's container is removed under its running code: the run ends
    early with exit 137, which must not be mistaken for the OOM killer's work."""
    task = new_id("tsk")
    busy = asyncio.create_task(run(client, task, "import time; time.sleep(30)", timeout_s=60))
    deadline = time.monotonic() + 20
    while not await task_containers(docker, task):
        assert time.monotonic() < deadline, "the run never started"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    gone = await call(
        client, subjects.SANDBOX_DESTROY, SandboxDestroyRequest(task_id=task), SandboxDestroyReply
    )
    assert gone.ok
    reply = await busy
    assert reply.outcome is ExecOutcome.ERROR, reply
    assert "sandbox was removed" in reply.stderr
    assert reply.duration_ms < 20_000


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


async def test_the_reaper_spares_a_pool_container_claimed_while_it_lists(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The engine lists a pool container under its pool name; if this replica claims it
    before the reaper looks at the list, the reaper must still know it for its own and
    not remove it as a dead replica's leftover (it did, mid-exec, once in CI)."""
    task = new_id("tsk")
    listing = aiodocker.containers.DockerContainers.list
    claim_during_list = True
    async with sandbox_on_own_root(
        settings, tmp_path / "claimed", pool_size=1, idle_ttl_s=1, reap_interval_s=3600
    ) as sandbox:

        async def list_then_claim(self: Any, **kwargs: Any) -> Any:
            nonlocal claim_during_list
            found = await listing(self, **kwargs)
            if claim_during_list:
                claim_during_list = False
                await sandbox.write_file(task, "claimed.txt", "mine\n")
            return found

        try:
            await sandbox.wait_pool_full()
            await asyncio.sleep(1.2)  # the pool container is older than the idle TTL
            monkeypatch.setattr(aiodocker.containers.DockerContainers, "list", list_then_claim)
            assert await sandbox.reap_idle() == 0
            assert not claim_during_list  # the claim did happen between list and look
            monkeypatch.undo()
            read = await sandbox.read_file(task, "claimed.txt", 100)
            assert read.content == "mine\n"
        finally:
            monkeypatch.undo()
            await sandbox.destroy(task)


# --- pause and resume ---------------------------------------------------------------------


async def test_a_task_resumed_after_its_container_was_reaped_finds_its_files(
    settings: Settings, docker: aiodocker.Docker, tmp_path: Path
) -> None:
    """A task paused for budget approval (up to an hour) outlives the idle TTL: the
    reaper removes its container, and the next call gets a new container on the same
    workspace, not an empty one from the warm pool."""
    task = new_id("tsk")
    async with sandbox_on_own_root(
        settings, tmp_path / "paused", pool_size=1, idle_ttl_s=1, reap_interval_s=0.2
    ) as sandbox:
        try:
            await sandbox.wait_pool_full()
            await sandbox.write_file(task, "notes/plan.md", "step 1 done\n")
            made = await run_direct(sandbox, task, "open('data.csv', 'w').write('a,b\\n1,2\\n')")
            assert made.outcome is ExecOutcome.OK, made
            (first,) = await task_containers(docker, task)

            deadline = time.monotonic() + 15  # paused: no calls while the reaper runs
            while await task_containers(docker, task):
                assert time.monotonic() < deadline, "the idle container was never reaped"
                await asyncio.sleep(0.2)
            await sandbox.wait_pool_full()  # an empty warm container waits, too

            resumed = await run_direct(
                sandbox, task, "cat data.csv notes/plan.md", language=Language.BASH
            )
            assert resumed.outcome is ExecOutcome.OK, resumed
            assert resumed.stdout == "a,b\n1,2\nstep 1 done\n"
            (second,) = await task_containers(docker, task)
            assert second.id != first.id  # a new container...
            listed = await sandbox.list_files(task)  # ...on the same files
            assert [(f.path, f.size) for f in listed.files] == [
                ("data.csv", 8),
                ("notes/plan.md", 12),
            ]
            read = await sandbox.read_file(task, "notes/plan.md", 1000)
            assert read.content == "step 1 done\n"
        finally:
            await sandbox.destroy(task)
