"""Sandbox rules in plain Python: workspace paths, limits, output caps, outcomes.

Nothing here touches Docker or the bus, so all of it is unit-tested without servers.

Security model (what this module is responsible for and what it is not):

* Every file operation on a task's workspace runs *inside* the task's container, as
  uid 65534, through ``docker exec``: the service never opens, follows or lists the
  host workspace directory on behalf of a request. Agent code can plant symlinks in
  its workspace (``ln -s / root``), but following them lands inside the container's
  own mount namespace: a read-only root filesystem with no network and no
  capabilities, where the only writable places are ``/workspace`` and ``/tmp``. So a
  symlink escape cannot reach the host, and the path rules below are about clear
  errors and predictable behaviour, not the last line of defence.
* :func:`workspace_path` still refuses paths that lexically leave ``/workspace``
  (absolute paths elsewhere, ``..`` escapes), NUL bytes and empty paths, so a caller
  asking for ``/etc/passwd`` hears "not allowed" instead of reading the image's copy.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentbus.contracts import ExecOutcome, Language

WORKSPACE = "/workspace"
"""Where the task's workspace is mounted inside its container (and the working dir)."""

SANDBOX_UID = 65534
SANDBOX_TMP = "/tmp"  # noqa: S108 - the container's private tmpfs, not the host's /tmp
SANDBOX_GID = 65534
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_GID}"
"""Every process in a sandbox runs as nobody:nogroup, never as root."""

EXIT_KILLED = 137  # 128 + SIGKILL: `timeout -s KILL` firing, or the kernel's OOM killer
NAME_MAX = 255  # bytes per path component on Linux
ARG_MAX_BYTES = 131_072 - 1  # MAX_ARG_STRLEN: the most bytes one argv string can hold

BASE_ENV: Mapping[str, str] = {
    "HOME": SANDBOX_TMP,  # nobody's home (/nonexistent) does not exist; /tmp is writable
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",  # output printed before a kill at the time limit is kept
    "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ litter in the user's workspace
}
"""Environment every exec starts from; a request's ``env`` is laid over it."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_OOM_KILL = re.compile(rb"^oom_kill (\d+)$", re.MULTILINE)
_USAGE_USEC = re.compile(r"^usage_usec (\d+)$", re.MULTILINE)


class SandboxError(Exception):
    """An expected failure the caller hears about in ``error`` (``ok=False``)."""


class SandboxUnavailable(SandboxError):
    """The Docker engine cannot be reached or the sandbox image is missing."""


class InvalidRequest(SandboxError):
    """The request can never be served as asked (bad path, bad env name, code too big)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and placement of the sandbox containers (built from the service settings)."""

    image: str
    workspace_root: Path
    memory_mb: int = 512
    cpus: float = 1.0
    pids_limit: int = 128
    nofile: int = 1024
    tmp_size_mb: int = 64
    default_timeout_s: float = 30
    max_timeout_s: float = 600
    max_output_bytes: int = 64 * 1024
    max_read_bytes: int = 512 * 1024
    max_list_bytes: int = 256 * 1024
    max_list_files: int = 5000
    file_op_timeout_s: float = 30
    safety_margin_s: float = 10
    workspace_max_mb: int = 1024
    max_upload_bytes: int = 512 * 1024
    pool_size: int = 2
    idle_ttl_s: float = 900
    reap_interval_s: float = 30
    guard_interval_s: float = 0.1
    refill_delay_s: float = 0.3

    @property
    def workspace_max_bytes(self) -> int:
        return self.workspace_max_mb * 1024 * 1024


# --- sizes ------------------------------------------------------------------------------


def check_upload(size: int, config: SandboxConfig, what: str) -> None:
    """Refuse an upload (file content, stdin) larger than ``max_upload_bytes``."""
    if size > config.max_upload_bytes:
        raise InvalidRequest(
            f"{what} is {size} bytes; the sandbox takes at most {config.max_upload_bytes} "
            "bytes per upload. Split it, or generate the data inside the sandbox"
        )


def check_room(used: int, adding: int, config: SandboxConfig) -> None:
    """Refuse a write that would take the workspace past its cap."""
    cap = config.workspace_max_bytes
    if used + adding > cap:
        raise InvalidRequest(
            f"the workspace is full: {used // 1024} KiB used, {adding // 1024} KiB more "
            f"would pass its {config.workspace_max_mb} MB cap; delete files first"
        )


def over_cap_note(used: int, config: SandboxConfig, *, killed: bool) -> str:
    """What the caller reads in stderr when a run filled the workspace."""
    size = f"{used / (1024 * 1024):.0f} MB"
    if killed:
        return (
            f"[sandbox: the run was stopped: the workspace grew to {size}, past its "
            f"{config.workspace_max_mb} MB cap; the container was replaced, files kept]"
        )
    return (
        f"[sandbox: the workspace holds {size}, over its {config.workspace_max_mb} MB cap; "
        "delete files: runs that grow it further are stopped]"
    )


# --- paths ------------------------------------------------------------------------------


def workspace_path(raw: str) -> str:
    """Normalise a request path to one relative to /workspace, or raise InvalidRequest.

    Accepted: ``data/x.csv``, ``./data//x.csv``, ``a/../b.txt`` and, because code run
    in the sandbox prints such paths, ``/workspace/data/x.csv``. Refused: empty paths,
    NUL bytes, other absolute paths, anything whose ``..`` climbs out of the workspace,
    the workspace itself, a trailing ``/`` (names a directory) and components longer
    than 255 bytes.
    """
    if not raw or not raw.strip():
        raise InvalidRequest("path is empty; give a file path relative to the workspace")
    if "\x00" in raw:
        raise InvalidRequest("path contains a NUL byte")
    path = raw
    if path.startswith("/"):
        prefix = WORKSPACE + "/"
        if not path.startswith(prefix):
            raise InvalidRequest(
                f"absolute path {raw!r} is not allowed; use a path relative to the "
                f"workspace ({WORKSPACE}), e.g. 'data/out.csv'"
            )
        path = path[len(prefix) :].lstrip("/")
    if path.endswith("/"):
        raise InvalidRequest(f"path {raw!r} names a directory; give a file path")
    norm = posixpath.normpath(path)  # "" -> "."
    if norm == ".":
        raise InvalidRequest(f"path {raw!r} is the workspace itself; give a file path")
    if norm == ".." or norm.startswith("../"):
        raise InvalidRequest(f"path {raw!r} leaves the workspace; '..' may not climb above it")
    for part in norm.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
            raise InvalidRequest(f"path component {part[:40]!r}... is longer than 255 bytes")
    return norm


def container_path(relative: str) -> str:
    """Absolute path inside the container of a path checked by :func:`workspace_path`.

    Always starts with ``/``, so no command ever mistakes it for an option.
    """
    return f"{WORKSPACE}/{relative}"


# --- exec requests ----------------------------------------------------------------------


def check_env(env: Mapping[str, str]) -> dict[str, str]:
    """The request's extra environment, checked; raises InvalidRequest."""
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name):
            raise InvalidRequest(
                f"environment variable name {name[:60]!r} is not valid "
                "(letters, digits and _, not starting with a digit)"
            )
        if "\x00" in value:
            raise InvalidRequest(f"environment variable {name} contains a NUL byte")
    return {**BASE_ENV, **env}


def clamp_timeout(requested: float | None, config: SandboxConfig) -> tuple[float, str | None]:
    """The time limit to run with, and a note for the caller when it was lowered."""
    wanted = config.default_timeout_s if requested is None else requested
    if wanted > config.max_timeout_s:
        return config.max_timeout_s, (
            f"[sandbox: time limit lowered from {wanted:g}s to the maximum of "
            f"{config.max_timeout_s:g}s]"
        )
    return max(wanted, 0.1), None


RUN_SCRIPT = """\
limit=$1; stdin=$2; shift 2
if [ -n "$stdin" ]; then exec 3<"$stdin" || exit 125; rm -f "$stdin"; else exec 3</dev/null; fi
timeout -s KILL "$limit" "$@" <&3 3<&- &
pid=$!
exec 3<&-
wait "$pid" 2>/dev/null; rc=$?
n=0; while [ "$n" -lt 1000 ] && kill -KILL "-$pid" 2>/dev/null; do n=$((n+1)); done
exit "$rc"
"""
"""Runs one program so that nothing it started outlives it.

GNU ``timeout`` puts itself and the program in a new process group; at the limit it
SIGKILLs that group (exit 137). When the program ends first, processes it left in the
background (``&``, ``subprocess.Popen``, a fork bomb) would live on and could fill the
pids limit, so the wrapper SIGKILLs the group afterwards, too. Only processes that
leave the group on purpose (``setsid``) survive until the container is removed at the
end of the task. stdin, when given, comes from a staged file deleted once open.
(``kill -KILL -PGID`` without ``--``: dash's builtin rejects ``--``. ``wait``'s own
stderr is muted, or dash adds "Killed" to the program's stderr.)
"""


def code_argv(
    language: Language, code: str, timeout_s: float, stdin_path: str | None = None
) -> list[str]:
    """The command that runs ``code`` under :data:`RUN_SCRIPT`'s limits.

    Code is passed as one argv string to the interpreter, never through a shell.
    """
    if "\x00" in code:
        raise InvalidRequest("code contains a NUL byte")
    size = len(code.encode("utf-8", "surrogatepass"))
    if size > ARG_MAX_BYTES:
        raise InvalidRequest(
            f"code is {size} bytes; at most {ARG_MAX_BYTES} fit in one run. Write it to a "
            "file with write_file and run that file instead"
        )
    interpreter = ["python3", "-c"] if language is Language.PYTHON else ["bash", "-c"]
    limit = f"{timeout_s:.3f}"
    return ["sh", "-c", RUN_SCRIPT, "sh", limit, stdin_path or "", *interpreter, code]


READY_ARGV = ["sh", "-c", 'read -r n || exit 0; cmd=$(head -c "$n"); eval "exec $cmd"']
"""A pre-started exec waiting for its run: it reads one instruction from stdin (a byte
count line, then that many bytes of shell-quoted command) and execs it. Starting an
exec is most of a run's latency (runc), so each task's container keeps one waiting;
the run then is exactly what a fresh exec would have run (:func:`ready_instruction`)."""


def ready_instruction(argv: list[str], env: Mapping[str, str]) -> bytes:
    """The instruction for :data:`READY_ARGV`: ``env K=V ... argv`` quoted for sh.

    ``env`` adds the run's variables on top of the exec's (the container's plus
    :data:`BASE_ENV`), as a fresh exec with that environment would see them.
    """
    words = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]  # argv[0] has no "="
    command = " ".join(shlex.quote(w) for w in words).encode("utf-8", "surrogatepass")
    return f"{len(command)}\n".encode() + command


def timeout_argv(timeout_s: float) -> list[str]:
    return ["timeout", "-s", "KILL", f"{timeout_s:.3f}"]


def stdin_file() -> str:
    """A fresh path on the container's private tmpfs to stage a run's stdin in."""
    return f"{SANDBOX_TMP}/.agentbus-stdin-{uuid.uuid4().hex}"


def stage_stdin_argv(path: str, timeout_s: float) -> list[str]:
    """Copy the exec's stdin into ``path`` (only the sandbox user can read it)."""
    return [*timeout_argv(timeout_s), "sh", "-c", 'umask 077 && cat > "$1"', "sh", path]


def write_argv(relative: str, timeout_s: float) -> list[str]:
    """Write stdin to the file, creating parent directories, as the sandbox user."""
    script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
    return [*timeout_argv(timeout_s), "sh", "-c", script, "sh", container_path(relative)]


READ_SCRIPT = (
    'if [ ! -e "$1" ]; then echo "no such file: $2" >&2; exit 2; fi; '
    'if [ ! -f "$1" ]; then echo "not a regular file: $2" >&2; exit 3; fi; '
    'stat -L -c %s -- "$1" && head -c "$3" -- "$1"'
)


def read_argv(relative: str, max_bytes: int, timeout_s: float) -> list[str]:
    """Print the file's size on one line, then at most ``max_bytes`` of its content."""
    path = container_path(relative)
    return [*timeout_argv(timeout_s), "sh", "-c", READ_SCRIPT, "sh", path, relative, str(max_bytes)]


def list_argv(timeout_s: float) -> list[str]:
    """Every regular file under /workspace as ``<size> <path>\\0`` (NUL-separated, so
    names with tabs or newlines survive); symlinks are listed, not followed."""
    return [
        *timeout_argv(timeout_s),
        "find",
        WORKSPACE,
        "-xdev",
        "-type",
        "f",
        "-printf",
        r"%s %P\0",
    ]


OOM_COUNTER_ARGV = [
    "sh",
    "-c",
    "cat /sys/fs/cgroup/memory.events 2>/dev/null || cat /sys/fs/cgroup/memory/memory.oom_control",
]
"""Reads the container cgroup's OOM-kill counter (cgroup v2, else v1)."""


def parse_oom_kills(output: bytes) -> int | None:
    """The ``oom_kill`` count from memory.events / memory.oom_control, if present."""
    match = _OOM_KILL.search(output)
    return int(match.group(1)) if match else None


CPU_USAGE_ARGV = [
    "sh",
    "-c",
    'p=$(sed -n "s/^0:://p" /proc/self/cgroup); '
    'cat "/sys/fs/cgroup${p%/}/cpu.stat" 2>/dev/null || cat /sys/fs/cgroup/cpuacct/cpuacct.usage',
]
"""Reads the container cgroup's CPU counter from inside (cgroup v2, else v1): what the
adapter falls back to when the host's cgroups are out of its sight. The v2 path comes
from /proc/self/cgroup: ``/`` under a private cgroup namespace, the full path under
the host's."""


def parse_cpu_usage(output: bytes | str) -> int:
    """CPU time in microseconds from cgroup v2 ``cpu.stat`` (``usage_usec``) or v1
    ``cpuacct.usage`` (a bare count of nanoseconds); raises ValueError otherwise."""
    text = output.decode("ascii", "replace") if isinstance(output, bytes) else output
    match = _USAGE_USEC.search(text)
    if match:
        return int(match.group(1))
    if text.strip().isdigit():
        return int(text) // 1000
    raise ValueError(f"not a cgroup CPU counter: {text[:80]!r}")


def parse_read_output(output: bytes) -> tuple[int, bytes]:
    """Split :func:`read_argv`'s output into (full size, content)."""
    head, sep, content = output.partition(b"\n")
    if not sep or not head.strip().isdigit():
        raise SandboxError("could not read the file (unexpected output from the sandbox)")
    return int(head), content


def parse_file_list(output: bytes, *, complete: bool) -> list[tuple[str, int]]:
    """Parse :func:`list_argv` output, sorted by path. When ``complete`` is False the
    output was cut, so a partial last entry is dropped."""
    entries = output.split(b"\0")
    last = entries.pop()  # b"" after the final NUL, or the cut-off entry
    if complete and last:
        entries.append(last)
    files: list[tuple[str, int]] = []
    for entry in entries:
        size, sep, name = entry.partition(b" ")
        if not sep or not size.isdigit() or not name:
            continue
        files.append((name.decode("utf-8", "replace"), int(size)))
    return sorted(files)


# --- output -----------------------------------------------------------------------------


def truncation_marker(cut: int) -> str:
    return f"\n[... output truncated: {cut} bytes cut]"


@dataclass
class OutputCap:
    """Collects one output stream up to ``limit`` bytes, keeping the head.

    Past the limit it only counts what it drops: the caller keeps draining the stream
    so the process never blocks on a full pipe, while memory stays bounded.
    """

    limit: int
    _chunks: list[bytes] = field(default_factory=list)
    _kept: int = 0
    dropped: int = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - self._kept
        if room >= len(data):
            self._chunks.append(data)
            self._kept += len(data)
            return
        if room > 0:
            self._chunks.append(data[:room])
            self._kept += room
        self.dropped += len(data) - max(room, 0)

    @property
    def truncated(self) -> bool:
        return self.dropped > 0

    @property
    def data(self) -> bytes:
        return b"".join(self._chunks)

    def text(self) -> str:
        """The kept bytes as UTF-8 (bad bytes replaced), with the marker when cut."""
        text = self.data.decode("utf-8", "replace")
        return text + truncation_marker(self.dropped) if self.truncated else text


def fit_json(text: str, budget: int) -> tuple[str, bool]:
    """Cut ``text`` so its JSON encoding takes at most ``budget`` bytes.

    Replies travel as JSON in one NATS message (1 MB by default); control characters
    grow sixfold when escaped, so a binary file's "text" can blow the limit.
    """

    def cost(s: str) -> int:
        return len(json.dumps(s, ensure_ascii=False).encode("utf-8", "surrogatepass"))

    if cost(text) <= budget:
        return text, False
    lo, hi = 0, len(text)
    while lo < hi:  # largest prefix that fits
        mid = (lo + hi + 1) // 2
        if cost(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo], True


# --- outcomes ---------------------------------------------------------------------------


def classify(
    exit_code: int | None,
    duration_s: float,
    limit_s: float,
    *,
    safety_net_fired: bool = False,
    oom_killed: bool = False,
    truncated: bool = False,
) -> ExecOutcome:
    """The typed outcome of one run.

    * ``timeout``: the outer safety net fired, or the run was SIGKILLed (137) at or
      after its limit, which is what ``timeout -s KILL`` does;
    * ``oom_killed``: SIGKILLed before the limit and the adapter's evidence says the
      kernel's OOM killer did it (see ``DockerSandbox``: the cgroup's oom_kill counter
      went up). A Python ``MemoryError`` is an ordinary ``error``;
    * ``output_truncated``: stdout or stderr was capped (check ``exit_code``, too);
    * ``ok``: exit code 0; anything else is ``error``.
    """
    if safety_net_fired:
        return ExecOutcome.TIMEOUT
    if exit_code == EXIT_KILLED and duration_s >= limit_s - 0.05:
        return ExecOutcome.TIMEOUT
    if exit_code == EXIT_KILLED and oom_killed:
        return ExecOutcome.OOM_KILLED
    if truncated:
        return ExecOutcome.OUTPUT_TRUNCATED
    if exit_code == 0:
        return ExecOutcome.OK
    return ExecOutcome.ERROR


def describe_failure(stderr: bytes, stdout: bytes, exit_code: int | None) -> str:
    """A one-line reason from a failed helper command (mkdir/cat/find)."""
    text = (stderr or stdout).decode("utf-8", "replace").strip()
    if not text:
        return f"the sandbox command failed (exit code {exit_code})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else text[:500]
