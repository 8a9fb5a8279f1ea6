"""``agentbus sandbox exec`` against the real Docker engine, through its parser."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator
from pathlib import Path

import aiodocker
import pytest
import structlog

from agentbus.cli import sandbox_cmd

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def keep_logging() -> Iterator[None]:
    """The command configures structlog for its process; put the tests' config back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AGENTBUS_HOME", str(tmp_path))
    tmp_path.chmod(0o755)
    return tmp_path


async def agentbus(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="agentbus")
    sandbox_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    code: int = await args.handler(args)
    return code


async def test_exec_runs_a_file_prints_its_output_and_mirrors_its_exit_code(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "job.py"
    script.write_text("import os, sys\nprint('hi from', os.getuid())\nsys.exit(3)\n")
    assert await agentbus("sandbox", "exec", "--lang", "python", str(script)) == 3
    out, err = capsys.readouterr()
    assert out == "hi from 65534\n"
    assert "[exit code 3, error," in err
    # Throwaway: no container and no workspace left behind.
    async with aiodocker.Docker() as docker:
        left = await docker.containers.list(
            all=True, filters={"label": [f"agentbus.workspace_root={home / 'workspaces'}"]}
        )
    assert left == []
    workspaces = home / "workspaces"
    assert [p.name for p in workspaces.iterdir() if not p.name.startswith(".")] == []
    assert list((workspaces / ".activity").iterdir()) == []


async def test_exec_reads_stdin_and_prints_the_typed_result_as_json(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("while True: pass\n"))
    code = await agentbus("sandbox", "exec", "--json", "--timeout", "1")
    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert (result["outcome"], result["exit_code"], code) == ("timeout", 137, 137)
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("import socket\nsocket.create_connection(('1.1.1.1', 53), 2)\n")
    )
    assert await agentbus("sandbox", "exec", "--json", "-") == 1
    result = json.loads(capsys.readouterr().out)
    assert "Network is unreachable" in result["stderr"]


async def test_exec_fails_clearly_without_the_image(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENTBUS_SANDBOX_IMAGE", "agentbus-sandbox:no-such-tag")
    monkeypatch.setattr("sys.stdin", io.StringIO("print(1)"))
    assert await agentbus("sandbox", "exec") == 3
    assert "make sandbox-image" in capsys.readouterr().err
