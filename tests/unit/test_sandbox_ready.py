"""The waiting exec's instruction: the command it execs is exactly the one asked for."""

from __future__ import annotations

import subprocess

from agentbus.sandbox.domain import READY_ARGV, ready_instruction

NASTY = ["it's", '"$HOME"', "`id`", "$(id)", "a\nb", "; rm -rf /", "*", "-n", "", "ünï"]


def test_the_loader_execs_the_argv_and_env_verbatim() -> None:
    argv = ["python3", "-c", "import os, sys; print(repr(sys.argv[1:]), repr(os.environ['X']))"]
    done = subprocess.run(
        READY_ARGV,
        input=ready_instruction([*argv, *NASTY], {"X": "v a l'u\ne"}),
        capture_output=True,
        check=True,
        timeout=10,
    )
    assert done.stdout.decode() == f"{NASTY!r} {'v a l' + chr(39) + 'u' + chr(10) + 'e'!r}\n"


def test_the_loader_exits_quietly_without_an_instruction() -> None:
    done = subprocess.run(READY_ARGV, input=b"", capture_output=True, timeout=10, check=False)
    assert (done.returncode, done.stdout) == (0, b"")
