"""Sandbox rules without Docker: workspace paths, output caps, outcomes, argv."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentbus.contracts import ExecOutcome, Language
from agentbus.sandbox import domain
from agentbus.sandbox.domain import InvalidRequest, OutputCap, SandboxConfig

# --- paths ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("out.csv", "out.csv"),
        ("data/out.csv", "data/out.csv"),
        ("./data//out.csv", "data/out.csv"),
        ("a/../b.txt", "b.txt"),
        ("a/b/../../c", "c"),
        ("/workspace/data/x.csv", "data/x.csv"),
        ("/workspace//x", "x"),
        ("..hidden", "..hidden"),
        ("dir/...", "dir/..."),
        ("-rf", "-rf"),
        ("sp ace/ünïcode.txt", "sp ace/ünïcode.txt"),
    ],
)
def test_workspace_path_normalises_paths_inside_the_workspace(raw: str, expected: str) -> None:
    assert domain.workspace_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../../etc/passwd", "leaves the workspace"),
        ("..", "leaves the workspace"),
        ("a/../../b", "leaves the workspace"),
        ("/workspace/../etc/passwd", "leaves the workspace"),
        ("/etc/passwd", "absolute path"),
        ("/", "absolute path"),
        ("/workspace", "absolute path"),
        ("/workspacex/y", "absolute path"),
        ("a\x00b", "NUL"),
        (".", "workspace itself"),
        ("a/..", "workspace itself"),
        ("/workspace/", "workspace itself"),
        ("data/", "names a directory"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_workspace_path_refuses_escapes_and_nonsense(raw: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        domain.workspace_path(raw)


def test_container_path_is_absolute_so_no_command_reads_it_as_an_option() -> None:
    assert domain.container_path(domain.workspace_path("-rf")) == "/workspace/-rf"


# --- output caps ------------------------------------------------------------------------


def test_output_cap_keeps_everything_under_the_limit() -> None:
    cap = OutputCap(10)
    cap.feed(b"hello")
    cap.feed(b"world")
    assert cap.data == b"helloworld"
    assert not cap.truncated
    assert cap.text() == "helloworld"


def test_output_cap_keeps_the_head_and_counts_the_rest() -> None:
    cap = OutputCap(8)
    for chunk in (b"abc", b"defgh", b"ijk", b"", b"lmnop"):
        cap.feed(chunk)
    assert cap.data == b"abcdefgh"
    assert cap.dropped == 8
    assert cap.text() == "abcdefgh\n[... output truncated: 8 bytes cut]"


def test_output_cap_splits_a_chunk_at_the_limit() -> None:
    cap = OutputCap(4)
    cap.feed(b"123456")
    assert cap.data == b"1234"
    assert cap.dropped == 2


def test_output_cap_survives_a_cut_in_the_middle_of_a_utf8_character() -> None:
    cap = OutputCap(3)
    cap.feed("aé€".encode())  # a(1) é(2) €(3): the cut lands inside €
    text = cap.text()
    assert text.startswith("aé")
    assert text.endswith(f"output truncated: {cap.dropped} bytes cut]")


def test_fit_json_cuts_text_whose_escaped_form_is_too_big() -> None:
    binary = "\x00" * 1000  # each escapes to \u0000: six bytes
    fitted, cut = domain.fit_json(binary, 600)
    assert cut
    assert len(json.dumps(fitted, ensure_ascii=False).encode()) <= 600
    assert len(fitted) >= 95
    assert domain.fit_json("plain", 600) == ("plain", False)


# --- outcomes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "duration", "kwargs", "expected"),
    [
        (0, 0.1, {}, ExecOutcome.OK),
        (1, 0.1, {}, ExecOutcome.ERROR),
        (137, 2.01, {}, ExecOutcome.TIMEOUT),
        (137, 0.3, {"oom_killed": True}, ExecOutcome.OOM_KILLED),
        (137, 0.3, {}, ExecOutcome.ERROR),  # SIGKILL from the code itself
        (None, 12.0, {"safety_net_fired": True}, ExecOutcome.TIMEOUT),
        (0, 0.1, {"truncated": True}, ExecOutcome.OUTPUT_TRUNCATED),
        (137, 2.5, {"truncated": True}, ExecOutcome.TIMEOUT),
        (None, 0.1, {}, ExecOutcome.ERROR),
    ],
)
def test_classify(
    exit_code: int | None, duration: float, kwargs: dict[str, bool], expected: ExecOutcome
) -> None:
    assert domain.classify(exit_code, duration, 2.0, **kwargs) is expected


def test_clamp_timeout_lowers_long_limits_and_says_so() -> None:
    config = SandboxConfig(image="i", workspace_root=Path("/w"), max_timeout_s=600)
    assert domain.clamp_timeout(30, config) == (30, None)
    limit, note = domain.clamp_timeout(3600, config)
    assert limit == 600
    assert note is not None
    assert "600" in note
    assert domain.clamp_timeout(None, config)[0] == config.default_timeout_s


# --- commands ---------------------------------------------------------------------------


def test_code_runs_under_a_hard_kill_and_never_through_a_shell_string() -> None:
    argv = domain.code_argv(Language.PYTHON, "print('; rm -rf /')", 2.5)
    assert argv == [
        "sh",
        "-c",
        domain.RUN_SCRIPT,
        "sh",
        "2.500",
        "",
        "python3",
        "-c",
        "print('; rm -rf /')",
    ]
    assert 'timeout -s KILL "$limit" "$@"' in domain.RUN_SCRIPT
    assert domain.code_argv(Language.BASH, "echo hi", 1)[-3:] == ["bash", "-c", "echo hi"]


def test_code_too_big_for_one_argument_is_refused_with_a_way_out() -> None:
    with pytest.raises(InvalidRequest, match="write_file"):
        domain.code_argv(Language.PYTHON, "#" * 200_000, 1)
    with pytest.raises(InvalidRequest, match="NUL"):
        domain.code_argv(Language.PYTHON, "print(1)\x00", 1)


def test_stdin_comes_from_the_staged_file() -> None:
    path = domain.stdin_file()
    assert path.startswith("/tmp/.agentbus-stdin-")
    argv = domain.code_argv(Language.PYTHON, "x", 3, path)
    assert argv[4:] == ["3.000", path, "python3", "-c", "x"]


def test_env_names_are_checked_and_laid_over_the_base() -> None:
    env = domain.check_env({"FOO": "bar", "HOME": "/workspace"})
    assert env["FOO"] == "bar"
    assert env["HOME"] == "/workspace"
    assert env["LANG"] == "C.UTF-8"
    for bad in ({"1X": "v"}, {"A=B": "v"}, {"": "v"}, {"X": "a\x00b"}):
        with pytest.raises(InvalidRequest):
            domain.check_env(bad)


# --- parsing ----------------------------------------------------------------------------


def test_parse_file_list_handles_odd_names_and_cut_output() -> None:
    out = b"12 b.txt\x003 dir/a\tb\x000 new\nline\x00"
    assert domain.parse_file_list(out, complete=True) == [
        ("b.txt", 12),
        ("dir/a\tb", 3),
        ("new\nline", 0),
    ]
    assert domain.parse_file_list(b"12 b.txt\x003 dir/par", complete=False) == [("b.txt", 12)]
    assert domain.parse_file_list(b"", complete=True) == []


def test_parse_read_output_and_oom_counter() -> None:
    assert domain.parse_read_output(b"5\nhel") == (5, b"hel")
    assert domain.parse_read_output(b"0\n") == (0, b"")
    with pytest.raises(domain.SandboxError):
        domain.parse_read_output(b"garbage")
    v1 = b"oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    v2 = b"low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n"
    assert domain.parse_oom_kills(v1) == 3
    assert domain.parse_oom_kills(v2) == 1
    assert domain.parse_oom_kills(b"") is None
