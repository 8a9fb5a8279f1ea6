"""A container's CPU counter, read from the host's cgroup filesystem.

A run is billed the CPU time its container used while the run lasted: the cgroup's
cumulative counter read before and after it. The counter covers every process in
the container, so a run killed at its time limit, or one that forks, is billed in
full (``getrusage`` would miss processes whose parent died first, which is what
``timeout -s KILL`` leaves behind). Docker's stats API carries the same counter but
answers only on its collector's one-second tick (``one-shot`` included, Docker
20.10), too slow to read twice per run.

The container's init PID (``State.Pid``) names its cgroup in ``/proc/<pid>/cgroup``;
``/proc/self/mountinfo`` says where that hierarchy is mounted. cgroup v2 keeps the
counter in ``cpu.stat`` (``usage_usec``), v1 in the cpuacct controller's
``cpuacct.usage`` (ns); a hybrid host has both and v2 is read first. Nothing is
guessed from the cgroup driver (``system.slice/docker-<id>.scope`` or
``docker/<id>``): the path is read. The cgroup path must contain the container id,
so a PID that means another process in this service's PID namespace (the service
itself runs in a container) is never mistaken for the sandbox's; :func:`locate` then
returns None and the adapter reads the counter from inside the container instead
(``domain.CPU_USAGE_ARGV``).

Everything here reads procfs and cgroupfs only: in-memory files that answer in
microseconds, so callers read them without a thread hop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import domain

V2_FILE = "cpu.stat"
V1_FILE = "cpuacct.usage"
V1_CONTROLLER = "cpuacct"


@dataclass(frozen=True)
class Membership:
    """One line of ``/proc/<pid>/cgroup``: ``hierarchy-id:controllers:path``."""

    hierarchy: str
    controllers: frozenset[str]
    path: str


@dataclass(frozen=True)
class Mount:
    """A cgroup filesystem mount from ``/proc/self/mountinfo``."""

    root: str
    point: str
    fstype: str
    options: frozenset[str]


@dataclass(frozen=True)
class CpuCounter:
    """The cgroup file holding a container's cumulative CPU time."""

    path: Path

    def read_usec(self) -> int:
        """CPU time (user + system) used so far, in microseconds.

        Raises OSError once the container is gone, ValueError on unknown content.
        """
        return domain.parse_cpu_usage(self.path.read_text())


def parse_memberships(text: str) -> list[Membership]:
    found = []
    for line in text.splitlines():
        hierarchy, sep, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if sep and sep2 and path.startswith("/"):
            names = frozenset(c for c in controllers.split(",") if c)
            found.append(Membership(hierarchy, names, path))
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    for code in ("040", "011", "012", "134"):
        field = field.replace(f"\\{code}", chr(int(code, 8)))
    return field


def parse_mounts(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in a mountinfo text.

    A line is ``id parent major:minor root point options [optional...] - fstype
    source super-options``.
    """
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3 or rest[0] not in {"cgroup", "cgroup2"}:
            continue
        options = frozenset(rest[2].split(","))
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), rest[0], options))
    return mounts


def candidates(container_id: str, memberships: list[Membership], mounts: list[Mount]) -> list[Path]:
    """Where the container's counter may be, v2 first; only cgroups named after it,
    and only mounts of a whole hierarchy (root ``/``: the path maps onto them)."""
    paths: list[Path] = []
    for member in memberships:
        if not container_id or container_id not in member.path:
            continue
        relative = member.path.lstrip("/")
        for mount in mounts:
            if mount.root != "/":
                continue
            if member.hierarchy == "0" and not member.controllers and mount.fstype == "cgroup2":
                paths.insert(0, Path(mount.point, relative, V2_FILE))
            elif (
                mount.fstype == "cgroup"
                and V1_CONTROLLER in member.controllers
                and V1_CONTROLLER in mount.options
            ):
                paths.append(Path(mount.point, relative, V1_FILE))
    return paths


def locate(container_id: str, pid: int, *, proc: Path = Path("/proc")) -> CpuCounter | None:
    """The container's CPU counter on this host, or None where it cannot be seen."""
    if pid <= 0:  # not running
        return None
    try:
        memberships = parse_memberships((proc / str(pid) / "cgroup").read_text())
        mounts = parse_mounts((proc / "self" / "mountinfo").read_text())
    except OSError:
        return None
    for path in candidates(container_id, memberships, mounts):
        counter = CpuCounter(path)
        try:
            counter.read_usec()
        except (OSError, ValueError):
            continue
        return counter
    return None
