"""``agentbus tasks list`` and ``agentbus costs``: stored tasks and LLM spend, asked of
the memory service over request/reply.

Wiring (in ``main.build_parser``): ``add_parsers(sub, tasks_sub)`` adds ``list`` to the
existing ``tasks`` sub-commands and ``costs`` at the top level.
"""

from __future__ import annotations

import argparse
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from agentbus.contracts import (
    SHOWN_STATUSES,
    CostsReply,
    CostsRequest,
    ModelUsage,
    Reply,
    TaskListReply,
    TaskListRequest,
    TaskStatus,
    subjects,
)
from agentbus.core.bus import rpc
from agentbus.core.ports import RpcError

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, *, now: datetime | None = None) -> datetime:
    """A point in time from the command line: ``7d``/``12h``/``30m``/``2w`` ago, ``today``,
    ``yesterday``, or an ISO date or date-time (UTC unless it names a zone)."""
    now = now or datetime.now(UTC)
    value = text.strip().lower()
    if value == "now":
        return now
    if value in {"today", "yesterday"}:
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=1 if value == "yesterday" else 0)
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - timedelta(**{_UNITS[relative[2]]: float(relative[1])})
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use e.g. 7d, 12h, today, 2026-11-01 or 2026-11-01T09:00)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def add_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    tasks_subparsers: argparse._SubParsersAction[argparse.ArgumentParser] | None = None,
) -> None:
    """Register ``tasks list`` (under ``tasks_subparsers`` when given, else under a new
    ``tasks`` command) and ``costs`` on the top-level ``subparsers``."""
    if tasks_subparsers is None:
        tasks = subparsers.add_parser("tasks", help="look at stored tasks")
        tasks_subparsers = tasks.add_subparsers(dest="tasks_command", required=True)
    add_tasks_list_parser(tasks_subparsers)

    costs = subparsers.add_parser("costs", help="LLM spend by model and by task over a time range")
    _add_range(costs, default_since="30d")
    costs.add_argument("--top", type=int, default=10, help="costliest tasks to list (default 10)")
    costs.add_argument("--json", action="store_true", help="print the reply as JSON")
    costs.set_defaults(handler=costs_command)


def add_tasks_list_parser(
    tasks_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    listing = tasks_subparsers.add_parser("list", help="stored tasks, newest first")
    listing.add_argument(
        "--status",
        choices=[s.value for s in TaskStatus if s in SHOWN_STATUSES],
        help="only tasks in this status",
    )
    _add_range(listing, default_since=None)
    listing.add_argument("--limit", type=int, default=20, help="most tasks to show (default 20)")
    listing.add_argument("--json", action="store_true", help="print the reply as JSON")
    listing.set_defaults(handler=tasks_list_command)


def _add_range(parser: argparse.ArgumentParser, *, default_since: str | None) -> None:
    since_help = "tasks submitted at or after this (7d, 12h, today, 2026-11-01, ...)"
    if default_since:
        since_help += f"; default {default_since}"
    parser.add_argument("--since", type=parse_when, default=default_since, help=since_help)
    parser.add_argument("--until", type=parse_when, help="tasks submitted before this")


# --- handlers ------------------------------------------------------------------------


R = TypeVar("R", bound=Reply)


def _short(goal: str, width: int) -> str:
    goal = goal.replace("\n", " ")
    return goal if len(goal) <= width else goal[: width - 3] + "..."


async def ask_memory(subject: str, request: Any, reply_type: type[R]) -> R | int:
    """Send one request to memory (starting the embedded stack if needed); an exit code
    if that fails."""
    from . import client
    from .locate import agentbus_home, bus
    from .stack import StackError

    try:
        async with (
            bus(agentbus_home(), {"memory": 1}, {}, say=False) as (url, _),
            client.connect(url) as broker,
        ):
            reply = await rpc(broker, subject, request, reply_type, timeout=15)
    except (StackError, RpcError) as exc:
        print(f"agentbus: {exc}", file=sys.stderr)
        return 3
    if not reply.ok:
        print(f"agentbus: {reply.error}", file=sys.stderr)
        return 1
    return reply


async def tasks_list_command(args: argparse.Namespace) -> int:
    since: datetime | None = args.since  # argparse parsed it (and the default) already
    request = TaskListRequest(
        status=TaskStatus(args.status) if args.status else None,
        since=since,
        until=args.until,
        limit=max(1, min(args.limit, 1000)),
    )
    reply = await ask_memory(subjects.MEMORY_TASK_LIST, request, TaskListReply)
    if isinstance(reply, int):
        return reply
    if args.json:
        print(reply.model_dump_json(indent=1))
        return 0
    if not reply.tasks:
        print("no tasks")
        return 0
    print(f"{'task':<25} {'status':<16} {'submitted (UTC)':<19} {'cost $':>9}  goal")
    for task in reply.tasks:
        print(
            f"{task.task_id:<25} {task.status.value:<16} {task.created_at:%Y-%m-%d %H:%M:%S} "
            f"{task.usage.total.cost_usd:>9.4f}  {_short(task.goal, 60)}"
        )
    return 0


async def costs_command(args: argparse.Namespace) -> int:
    since: datetime | None = args.since  # argparse parsed it (and the default) already
    request = CostsRequest(since=since, until=args.until, top_tasks=max(0, min(args.top, 1000)))
    reply = await ask_memory(subjects.MEMORY_COSTS, request, CostsReply)
    if isinstance(reply, int):
        return reply
    if args.json:
        print(reply.model_dump_json(indent=1))
        return 0
    start = f"{since:%Y-%m-%d %H:%M}" if since else "the beginning"
    end = f"{args.until:%Y-%m-%d %H:%M}" if args.until else "now"
    print(f"LLM spend of the {reply.tasks} task(s) submitted from {start} to {end} (UTC)\n")
    header = f"{'model':<36} {'calls':>7} {'tokens in':>11} {'tokens out':>11} {'cost $':>10}"
    print(header)
    print("-" * len(header))
    for model, used in sorted(reply.by_model.items(), key=lambda kv: -kv[1].cost_usd):
        print(_usage_row(model, used))
    print("-" * len(header))
    print(_usage_row("total", reply.total))
    if reply.by_task:
        print(f"\ncostliest tasks:\n{'task':<25} {'status':<16} {'cost $':>10}  goal")
        for task in reply.by_task:
            print(
                f"{task.task_id:<25} {task.status.value:<16} "
                f"{task.usage.total.cost_usd:>10.4f}  {_short(task.goal, 50)}"
            )
    return 0


def _usage_row(name: str, used: ModelUsage) -> str:
    return (
        f"{name:<36} {used.calls:>7} {used.prompt_tokens:>11} "
        f"{used.completion_tokens:>11} {used.cost_usd:>10.4f}"
    )
