"""Finding and reading a sandbox container's CPU counter on the host (cgroup v1, v2,
hybrid; cgroupfs and systemd drivers), against fake /proc and cgroup trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbus.sandbox.adapters import cgroup
from agentbus.sandbox.domain import parse_cpu_usage

CID = "58d14e4340e923ea81130e3934e511c1a1ff49ef48e294402c71335503177458"
CPU_STAT = "usage_usec 31917\nuser_usec 18238\nsystem_usec 13679\nnice_usec 0\n"


def test_cpu_usage_parses_v2_cpu_stat_and_v1_nanoseconds() -> None:
    assert parse_cpu_usage(CPU_STAT) == 31917
    assert parse_cpu_usage(b"31917722\n") == 31917  # cpuacct.usage counts nanoseconds
    for garbage in ("", "nice_usec 5\n", "-1", b"cat: no such file"):
        with pytest.raises(ValueError, match="not a cgroup CPU counter"):
            parse_cpu_usage(garbage)


class Host:
    """A fake host: /proc/<pid>/cgroup, /proc/self/mountinfo and cgroup files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc = root / "proc"
        (self.proc / "self").mkdir(parents=True)
        self.mountinfo: list[str] = []

    def mount(self, name: str, fstype: str, options: str, root: str = "/") -> Path:
        point = self.root / "sys" / name
        point.mkdir(parents=True)
        n = len(self.mountinfo) + 30
        self.mountinfo.append(
            f"{n} 23 0:{n} {root} {point} rw,relatime shared:9 - {fstype} cgroup rw,{options}"
        )
        (self.proc / "self" / "mountinfo").write_text("\n".join(self.mountinfo) + "\n")
        return point

    def process(self, pid: int, lines: list[str]) -> None:
        (self.proc / str(pid)).mkdir()
        (self.proc / str(pid) / "cgroup").write_text("\n".join(lines) + "\n")

    @staticmethod
    def counter(directory: Path, name: str, content: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(content)
        return directory / name

    def locate(self, pid: int = 42) -> cgroup.CpuCounter | None:
        return cgroup.locate(CID, pid, proc=self.proc)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_cgroup_v2_systemd_driver(host: Host) -> None:
    unified = host.mount("cgroup", "cgroup2", "nsdelegate")
    scope = f"system.slice/docker-{CID}.scope"
    host.process(42, [f"0::/{scope}"])
    expected = host.counter(unified / scope, "cpu.stat", CPU_STAT)
    counter = host.locate()
    assert counter is not None
    assert counter.path == expected
    assert counter.read_usec() == 31917


def test_cgroup_v1_cgroupfs_driver_with_a_combined_cpu_mount(host: Host) -> None:
    host.mount("memory", "cgroup", "memory")
    cpu = host.mount("cpu,cpuacct", "cgroup", "cpu,cpuacct")
    host.process(42, [f"4:memory:/docker/{CID}", f"2:cpu,cpuacct:/docker/{CID}"])
    host.counter(cpu / "docker" / CID, "cpuacct.usage", "2500000000\n")
    counter = host.locate()
    assert counter is not None
    assert counter.read_usec() == 2_500_000


def test_a_hybrid_host_reads_v2_first_and_v1_when_v2_has_no_counter(host: Host) -> None:
    cpuacct = host.mount("cpuacct", "cgroup", "cpuacct")
    unified = host.mount("unified", "cgroup2", "")
    host.process(42, [f"2:cpuacct:/docker/{CID}", f"0::/docker/{CID}"])
    v1 = host.counter(cpuacct / "docker" / CID, "cpuacct.usage", "7000\n")
    v2 = host.counter(unified / "docker" / CID, "cpu.stat", CPU_STAT)
    assert (counter := host.locate()) is not None
    assert counter.path == v2
    v2.write_text("")  # an unknown file: not a counter
    assert (counter := host.locate()) is not None
    assert counter.path == v1


def test_a_pid_that_is_not_the_container_is_never_read(host: Host) -> None:
    """The service in a container of its own sees another process under that PID:
    its cgroup does not carry the container id, so nothing is read."""
    unified = host.mount("cgroup", "cgroup2", "")
    host.process(42, ["0::/"])
    host.counter(unified, "cpu.stat", CPU_STAT)
    assert host.locate() is None
    assert host.locate(pid=7) is None  # no such process
    assert host.locate(pid=0) is None  # the container is not running


def test_a_mount_of_part_of_a_hierarchy_is_skipped(host: Host) -> None:
    """Under a cgroup namespace the mount's root is not ``/``: paths do not map."""
    inner = host.mount("cgroup", "cgroup2", "", root=f"/docker/{CID}")
    host.process(42, [f"0::/docker/{CID}"])
    host.counter(inner / "docker" / CID, "cpu.stat", CPU_STAT)
    assert host.locate() is None


def test_mountinfo_parsing_unescapes_paths_and_ignores_other_filesystems() -> None:
    text = (
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
        "40 31 0:37 / /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw shared:1 master:2 - cgroup2 cgroup2 rw\n"
        "garbage\n"
    )
    mounts = cgroup.parse_mounts(text)
    assert [(m.point, m.fstype) for m in mounts] == [
        ("/sys/fs/cgroup/with space", "cgroup"),
        ("/sys/fs/cgroup/unified", "cgroup2"),
    ]
    assert "cpuacct" in mounts[0].options
