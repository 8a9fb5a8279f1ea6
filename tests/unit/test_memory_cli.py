"""``agentbus tasks list`` and ``agentbus costs``: time parsing and argument wiring."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from agentbus.cli.tasks_cmd import add_parsers, costs_command, parse_when, tasks_list_command

NOW = datetime(2026, 11, 29, 15, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("12h", NOW - timedelta(hours=12)),
        ("30m", NOW - timedelta(minutes=30)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2w", NOW - timedelta(weeks=2)),
        ("today", datetime(2026, 11, 29, tzinfo=UTC)),
        ("yesterday", datetime(2026, 11, 28, tzinfo=UTC)),
        ("now", NOW),
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T09:00", datetime(2026, 11, 1, 9, tzinfo=UTC)),
        (
            "2026-11-01T09:00+02:00",
            datetime(2026, 11, 1, 9, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_times_are_read_as_relative_named_or_iso(text: str, expected: datetime) -> None:
    assert parse_when(text, now=NOW) == expected


def test_a_bad_time_says_what_is_accepted() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"use e\.g\. 7d"):
        parse_when("last tuesday")


def parser_with_existing_tasks_command() -> argparse.ArgumentParser:
    """As main.build_parser builds it: a ``tasks`` command with ``show`` already there."""
    parser = argparse.ArgumentParser(prog="agentbus")
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    tasks_sub.add_parser("show").add_argument("task_id")
    add_parsers(sub, tasks_sub)
    return parser


def test_tasks_list_joins_the_existing_tasks_command() -> None:
    parser = parser_with_existing_tasks_command()
    args = parser.parse_args(
        ["tasks", "list", "--status", "failed", "--since", "2026-11-01", "--limit", "5"]
    )
    assert args.handler is tasks_list_command
    assert (args.status, args.limit, args.until) == ("failed", 5, None)
    assert args.since == datetime(2026, 11, 1, tzinfo=UTC)
    assert parser.parse_args(["tasks", "show", "tsk_1"]).task_id == "tsk_1"
    with pytest.raises(SystemExit):
        parser.parse_args(["tasks", "list", "--status", "lost"])


def test_costs_default_to_the_last_30_days() -> None:
    args = parser_with_existing_tasks_command().parse_args(["costs", "--top", "3"])
    assert args.handler is costs_command
    assert args.top == 3
    assert isinstance(args.since, datetime)
    age = datetime.now(UTC) - args.since
    assert timedelta(days=29, hours=23) < age < timedelta(days=30, minutes=1)


def test_without_a_tasks_command_add_parsers_makes_one() -> None:
    parser = argparse.ArgumentParser(prog="agentbus")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    assert parser.parse_args(["tasks", "list"]).handler is tasks_list_command
