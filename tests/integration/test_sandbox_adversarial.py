"""Agent code trying to get out, against the real Docker engine.

Each test runs an attack through the sandbox service (over NATS, as the executor
calls it), asserts the attack failed, then asserts the service still serves: a plain
run works, in the attacked task where that makes sense and in a fresh one. The
service here runs with small caps (256 MB memory, 64 MB workspace, 64 MB /tmp) so
the resource attacks finish fast. Fixtures come from the service module.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest
from faststream import FastStream, TestApp
from faststream.nats import NatsBroker

from agentbus.contracts import (
    ExecOutcome,
    Language,
    SandboxExecReply,
    SandboxListFilesReply,
    SandboxListFilesRequest,
    SandboxReadFileReply,
    SandboxReadFileRequest,
    SandboxWriteFileReply,
    SandboxWriteFileRequest,
    new_id,
    subjects,
)
from agentbus.core.settings import BusSettings
from agentbus.sandbox import Settings, create_app
from agentbus.sandbox.adapters.workspace import disk_usage
from tests.integration import test_sandbox_service as base
from tests.integration.test_sandbox_service import call, run, task_containers
from tests.support import run_direct, sandbox_on_own_root

pytestmark = pytest.mark.integration

MB = 1024 * 1024
WORKSPACE_CAP_MB = 64

workspace_root = base.workspace_root
docker = base.docker
client = base.client


@pytest.fixture(scope="module")
def settings(nats_url: str, workspace_root: Path) -> Settings:
    return Settings(
        bus=BusSettings(nats_url=nats_url),
        workspace_root=workspace_root,
        memory_mb=256,
        workspace_max_mb=WORKSPACE_CAP_MB,
        tmp_size_mb=64,
    )


@pytest.fixture(scope="module")
async def service(settings: Settings, docker: aiodocker.Docker) -> AsyncIterator[FastStream]:
    app = create_app(settings)
    async with TestApp(app):
        yield app


async def assert_healthy(client: NatsBroker, *task_ids: str) -> None:
    """The service still runs code: in each given task and in a brand-new one."""
    for task in (*task_ids, new_id("tsk")):
        reply = await run(client, task, "print(6 * 7)")
        assert reply.ok, reply.error
        assert (reply.outcome, reply.stdout) == (ExecOutcome.OK, "42\n"), reply


async def write(client: NatsBroker, task: str, path: str, content: str) -> SandboxWriteFileReply:
    request = SandboxWriteFileRequest(task_id=task, path=path, content=content)
    return await call(client, subjects.SANDBOX_WRITE_FILE, request, SandboxWriteFileReply)


async def read(client: NatsBroker, task: str, path: str) -> SandboxReadFileReply:
    request = SandboxReadFileRequest(task_id=task, path=path)
    return await call(client, subjects.SANDBOX_READ_FILE, request, SandboxReadFileReply)


async def listing(client: NatsBroker, task: str) -> list[str]:
    request = SandboxListFilesRequest(task_id=task)
    reply = await call(client, subjects.SANDBOX_LIST_FILES, request, SandboxListFilesReply)
    assert reply.ok, reply.error
    return [f.path for f in reply.files]


# --- network ------------------------------------------------------------------------------


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A TCP port listening on the host's loopback, which the sandbox must not reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


async def test_no_network_egress_tcp_or_dns(client: NatsBroker, host_listener: int) -> None:
    code = (
        "import socket\n"
        f"for host, port in (('127.0.0.1', {host_listener}), ('1.1.1.1', 53), "
        "('8.8.8.8', 443)):\n"
        "    try:\n"
        "        socket.create_connection((host, port), timeout=3).close()\n"
        "        print('connected', host)\n"
        "    except OSError as exc:\n"
        "        print('blocked', host, exc.errno)\n"
        "try:\n"
        "    print('resolved', socket.getaddrinfo('example.com', 80))\n"
        "except OSError as exc:\n"
        "    print('dns failed')\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
    )
    task = new_id("tsk")
    reply = await run(client, task, code)
    assert "connected" not in reply.stdout
    assert "resolved" not in reply.stdout
    lines = reply.stdout.splitlines()
    assert lines[0] == "blocked 127.0.0.1 111"  # the container's own loopback: refused
    assert lines[1:3] == ["blocked 1.1.1.1 101", "blocked 8.8.8.8 101"]  # no route at all
    assert lines[3:] == ["dns failed", "['lo']"]
    await assert_healthy(client, task)


# --- host and other tasks -----------------------------------------------------------------


async def test_host_files_are_not_visible(client: NatsBroker) -> None:
    marker = Path("/tmp") / f"agentbus-host-marker-{uuid.uuid4().hex}"
    marker.write_text("host secret")
    try:
        task = new_id("tsk")
        code = (
            "import os\n"
            f"print(os.path.exists({str(marker)!r}))\n"
            "try:\n"
            "    print(open('/etc/shadow').read())\n"
            "except OSError as exc:\n"
            "    print('shadow', exc.errno)\n"
            "print(open('/proc/1/cmdline').read().split(chr(0))[0])\n"
        )
        reply = await run(client, task, code)
        assert reply.stdout.splitlines() == ["False", "shadow 13", "/sbin/docker-init"]
        assert not (await read(client, task, str(marker))).ok
    finally:
        marker.unlink()
    await assert_healthy(client, task)


async def test_two_tasks_at_once_do_not_see_each_others_files(
    client: NatsBroker, workspace_root: Path
) -> None:
    alice, bob = new_id("tsk"), new_id("tsk")
    code = (
        "import os, time\n"
        "me = os.environ['ME']\n"
        "open(f'{me}.txt', 'w').write(me)\n"
        "time.sleep(1)\n"  # both tasks' files exist now
        "print(sorted(os.listdir('.')))\n"
    )
    replies = await asyncio.gather(
        run(client, alice, code, env={"ME": "alice"}), run(client, bob, code, env={"ME": "bob"})
    )
    assert [r.stdout for r in replies] == ["['alice.txt']\n", "['bob.txt']\n"]
    assert await listing(client, bob) == ["bob.txt"]
    # Even knowing where the other workspace lives on the host does not help.
    peek = await run(
        client,
        bob,
        f"ln -s {workspace_root / alice} alice && cat alice/alice.txt; "
        f"ls /workspace/../{alice} {workspace_root}",
        language=Language.BASH,
    )
    assert "alice" not in peek.stdout
    assert not (await read(client, bob, "alice/alice.txt")).ok
    assert (await read(client, alice, "alice.txt")).content == "alice"
    await assert_healthy(client, alice, bob)


# --- the file API -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../../etc/passwd", "leaves the workspace"),
        ("a/../../etc/passwd", "leaves the workspace"),
        ("/workspace/../etc/passwd", "leaves the workspace"),
        ("/etc/passwd", "absolute path"),
        ("x\x00y", "NUL byte"),
    ],
)
async def test_paths_outside_the_workspace_are_refused(
    client: NatsBroker, path: str, reason: str
) -> None:
    task = new_id("tsk")
    reply = await read(client, task, path)
    assert not reply.ok
    assert reply.error is not None
    assert reason in reply.error
    assert reply.content == ""
    assert not (await write(client, task, path, "x")).ok
    await assert_healthy(client, task)


async def test_symlinks_lead_only_into_the_container(client: NatsBroker) -> None:
    task = new_id("tsk")
    made = await run(
        client, task, "ln -s / root && ln -s /etc/hostname host", language=Language.BASH
    )
    assert made.exit_code == 0
    escape = f"agentbus-escape-{uuid.uuid4().hex}"
    assert not (await write(client, task, f"root/etc/{escape}", "x")).ok  # read-only root
    assert not (await write(client, task, f"root/tmp/../etc/{escape}", "x")).ok
    assert not Path("/etc", escape).exists()
    hostname = await read(client, task, "host")
    assert hostname.ok  # the container's own /etc/hostname, not the host's
    assert hostname.content.strip() != socket.gethostname()
    await assert_healthy(client, task)


# --- resources ----------------------------------------------------------------------------


async def test_a_fork_bomb_hurts_only_its_own_run(client: NatsBroker) -> None:
    task = new_id("tsk")
    spawned = await run(
        client, task, "import subprocess\nsubprocess.Popen(['sleep', '300'])\nprint('spawned')"
    )
    assert spawned.stdout == "spawned\n"
    bomb = await run(client, task, ":(){ :|:& };:", language=Language.BASH, timeout_s=5)
    assert bomb.ok
    ps = await run(client, task, "ps -eo args=", language=Language.BASH)
    assert "sleep 300" not in ps.stdout  # nothing a run started outlives it
    assert "bash" not in ps.stdout.replace("bash -c ps -eo args=", "")
    await assert_healthy(client, task)


async def test_a_memory_bomb_is_oom_killed(client: NatsBroker) -> None:
    task = new_id("tsk")
    reply = await run(client, task, "x = bytearray(600 * 1024 * 1024)\nprint('alive')")
    assert reply.outcome is ExecOutcome.OOM_KILLED
    assert reply.exit_code == 137
    assert "alive" not in reply.stdout
    assert "memory limit" in reply.stderr
    await assert_healthy(client, task)


async def test_an_endless_loop_is_killed_at_its_limit_and_leaves_nothing(
    client: NatsBroker,
) -> None:
    task = new_id("tsk")
    started = time.monotonic()
    reply = await run(client, task, "print('started')\nwhile True: pass", timeout_s=2)
    elapsed = time.monotonic() - started
    assert reply.outcome is ExecOutcome.TIMEOUT
    assert reply.exit_code == 137
    assert reply.stdout == "started\n"  # output before the kill is kept
    assert elapsed < 15  # killed inside, not left to the caller's patience
    ps = await run(client, task, "ps -eo comm=", language=Language.BASH)
    assert "python3" not in ps.stdout.split()
    await assert_healthy(client, task)


async def test_huge_output_is_capped_with_a_marker(client: NatsBroker) -> None:
    task = new_id("tsk")
    reply = await run(client, task, "print('x' * 3_000_000)\nprint('y', end='')")
    assert reply.ok
    assert reply.exit_code == 0
    assert reply.outcome is ExecOutcome.OUTPUT_TRUNCATED
    head, marker = reply.stdout.split("\n[... output truncated: ")
    assert head == "x" * 64 * 1024
    assert marker == f"{3_000_002 - 64 * 1024} bytes cut]"
    await assert_healthy(client, task)


async def test_filling_the_workspace_is_stopped(client: NatsBroker, workspace_root: Path) -> None:
    task = new_id("tsk")
    cap = WORKSPACE_CAP_MB * MB
    # One file bigger than the cap: the fsize limit stops it at the cap.
    big = await run(client, task, "open('big', 'wb').write(b'x' * (100 * 2**20))")
    assert big.outcome is ExecOutcome.ERROR
    assert "File too large" in big.stderr
    removed = await run(client, task, "import os; os.remove('big')")
    assert removed.outcome is ExecOutcome.OK, removed
    # Many files, each under the cap: the guard stops the run and replaces the container.
    fill = (
        "i = 0\n"
        "while True:\n"
        "    with open(f'fill{i}', 'wb') as f:\n"
        "        f.write(b'x' * (4 * 2**20))\n"
        "    i += 1\n"
    )
    filled = await run(client, task, fill, timeout_s=60)
    assert filled.outcome is ExecOutcome.ERROR
    assert f"past its {WORKSPACE_CAP_MB} MB cap" in filled.stderr
    assert filled.cpu_seconds > 0  # read just before its container was replaced
    used = disk_usage(workspace_root / task)
    assert used < cap + 512 * MB  # stopped within one look (0.1 s) of passing the cap
    refused = await write(client, task, "more.txt", "x" * 1000)
    assert not refused.ok
    assert refused.error is not None
    assert "workspace is full" in refused.error
    # Deleting files makes room again.
    cleaned = await run(client, task, "rm -f fill*", language=Language.BASH)
    assert cleaned.outcome is ExecOutcome.OK, cleaned
    assert (await write(client, task, "more.txt", "x" * 1000)).ok
    await assert_healthy(client, task)


async def test_filling_tmp_hits_its_tmpfs_cap(client: NatsBroker) -> None:
    task = new_id("tsk")
    reply = await run(
        client,
        task,
        "for i in 1 2 3; do dd if=/dev/zero of=/tmp/fill$i bs=1M count=40; done; du -sm /tmp",
        language=Language.BASH,
    )
    assert "No space left on device" in reply.stderr
    assert int(reply.stdout.split()[0]) <= 64
    await assert_healthy(client, task)


# --- the kernel ---------------------------------------------------------------------------


async def test_proc_sys_and_mount_are_out_of_reach(client: NatsBroker) -> None:
    task = new_id("tsk")
    code = (
        "import ctypes, os\n"
        "try:\n"
        "    open('/proc/sys/kernel/hostname', 'w').write('pwned')\n"
        "    print('wrote /proc/sys')\n"
        "except OSError as exc:\n"
        "    print('proc', exc.errno)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "os.makedirs('/tmp/m', exist_ok=True)\n"
        "rc = libc.mount(b'none', b'/tmp/m', b'tmpfs', 0, None)\n"
        "print('mount', rc, ctypes.get_errno())\n"
        "rc = libc.unshare(0x10000000 | 0x00020000)\n"  # CLONE_NEWUSER | CLONE_NEWNS
        "print('unshare', rc, ctypes.get_errno())\n"
    )
    reply = await run(client, task, code)
    assert reply.stdout.splitlines() == ["proc 30", "mount -1 1", "unshare -1 1"]  # EROFS, EPERM
    assert Path("/proc/sys/kernel/hostname").read_text().strip() != "pwned"
    await assert_healthy(client, task)


# --- leftovers ----------------------------------------------------------------------------


async def test_a_container_left_running_after_its_task_is_reaped(
    client: NatsBroker, docker: aiodocker.Docker, tmp_path: Path, settings: Settings
) -> None:
    """A task that ends without its end event reaching us (or a crashed replica) must
    not leave its container running: the idle reaper removes it."""
    root = tmp_path / "reaper"
    async with sandbox_on_own_root(
        settings, root, pool_size=0, idle_ttl_s=1, reap_interval_s=0.2
    ) as sandbox:
        # A dead replica's pool container: started, never claimed, nobody to remove it.
        orphan = await docker.containers.create(
            {
                "Image": base.IMAGE,
                "Cmd": ["sleep", "infinity"],
                "Labels": {"agentbus.role": "sandbox", base.LABEL_ROOT: str(root)},
                "HostConfig": {"NetworkMode": "none"},
            },
            name=f"agentbus-pool-{uuid.uuid4().hex[:16]}",
        )
        await orphan.start()
        task = new_id("tsk")
        busy = asyncio.create_task(
            run_direct(sandbox, task, "import time; time.sleep(3)", timeout_s=10)
        )
        await asyncio.sleep(2)
        assert len(await task_containers(docker, task)) == 1  # busy: not idle
        reply: SandboxExecReply = await busy
        assert reply.outcome is ExecOutcome.OK  # ran to its end, not reaped under it
        deadline = time.monotonic() + 15
        while await task_containers(docker, task):
            assert time.monotonic() < deadline, "an idle container was never reaped"
            await asyncio.sleep(0.2)
        assert (root / task).is_dir()  # the workspace stays for the user
        assert not await base.exists(docker, orphan.id)
    await assert_healthy(client)


async def test_killing_every_sandbox_process_breaks_nothing(client: NatsBroker) -> None:
    """Code that kills all it can (the waiting exec of the next run included) only
    ends its own run; the next run starts afresh."""
    task = new_id("tsk")
    assert (await run(client, task, "print('warm')")).stdout == "warm\n"
    await asyncio.sleep(0.5)  # the next run's exec is waiting by now
    killed = await run(client, task, "kill -9 -1", language=Language.BASH)
    assert killed.exit_code == 137
    await assert_healthy(client, task)
