"""``agentbus``: run tasks, run the stack, look at stored tasks.

With no AGENTBUS_NATS_URL configured, commands use the stack started by ``agentbus up``
when one is running, and otherwise start the embedded stack for their own run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from faststream.nats import NatsBroker

from agentbus.contracts import (
    Budget,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskStatus,
    TaskSubmitted,
    new_id,
    parse_event,
    subjects,
    utcnow,
)
from agentbus.core import semconv
from agentbus.core.bus import RpcError
from agentbus.core.llm import NOT_CONFIGURED_HINT, LLMError, build_transcript
from agentbus.core.llm.replay import load_transcripts
from agentbus.core.settings import LLMSettings, TelemetrySettings
from agentbus.core.tracing import build_tracer_provider

from . import client, sandbox_cmd, tasks_cmd
from .render import render_event, render_usage
from .stack import EmbeddedStack, StackError

ALL_SERVICES = dict.fromkeys(subjects.SERVICES, 1)


def agentbus_home() -> Path:
    return Path(os.environ.get("AGENTBUS_HOME") or Path.home() / ".agentbus").expanduser()


def _external_nats_url() -> str | None:
    return os.environ.get("AGENTBUS_NATS_URL") or os.environ.get("NATS_URL") or None


def _stack_file(home: Path) -> Path:
    return home / "stack.json"


def _running_up_stack(home: Path) -> str | None:
    """The NATS URL of a live ``agentbus up`` on this machine, if any."""
    try:
        info = json.loads(_stack_file(home).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(info["nats_url"])


@contextlib.asynccontextmanager
async def bus(
    home: Path, replicas: Mapping[str, int], extra_env: Mapping[str, str], say: bool = True
) -> AsyncIterator[tuple[str, bool]]:
    """Yield (nats_url, embedded) for a command, starting the embedded stack if needed."""
    url = _external_nats_url() or _running_up_stack(home)
    if url:
        yield url, False
        return
    if say:
        print(f"starting the embedded stack in {home} ...", file=sys.stderr)
    started = time.monotonic()
    stack = EmbeddedStack(home=home, replicas=replicas, extra_env=extra_env, ephemeral_nats=True)
    async with stack:
        if say:
            print(f"stack ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
        yield stack.nats_url or "", True


# --- run -----------------------------------------------------------------------------


def _llm_env(args: argparse.Namespace) -> tuple[dict[str, str], str | None]:
    """Env for the child services and the goal a replay was recorded for."""
    if args.replay:
        path = Path(args.replay)
        if not path.exists():
            raise SystemExit(f"agentbus: no replay transcript at {path}")
        try:
            transcripts = load_transcripts(path)
        except (LLMError, ValueError) as exc:
            raise SystemExit(f"agentbus: bad replay transcript in {path}: {exc}") from exc
        env = {"AGENTBUS_LLM_PROVIDER": "replay", "AGENTBUS_LLM_REPLAY_FILE": str(path.resolve())}
        # One transcript: its task is the default; several: --task picks one by its goal.
        return env, transcripts[0].goal if len(transcripts) == 1 else None
    return {}, None


def _budget(args: argparse.Namespace) -> Budget:
    fields: dict[str, float | int] = {}
    if args.max_steps is not None:
        fields["max_steps"] = args.max_steps
    if args.max_tokens is not None:
        fields["max_tokens"] = args.max_tokens
    if args.max_cost is not None:
        fields["max_cost_usd"] = args.max_cost
    if args.max_time is not None:
        fields["max_wall_seconds"] = args.max_time
    return Budget.model_validate(fields)


async def _run(args: argparse.Namespace) -> int:
    home = agentbus_home()
    env, recorded_goal = _llm_env(args)
    goal = args.task or recorded_goal
    if not goal:
        print('agentbus: give the task with --task "..."', file=sys.stderr)
        return 2
    external = _external_nats_url() or _running_up_stack(home)
    if not external and not env and not LLMSettings().configured:
        print(f"agentbus: {NOT_CONFIGURED_HINT}", file=sys.stderr)
        return 2
    if external and env:
        print(
            "agentbus: note: --replay only configures the embedded stack; the running "
            "services use their own LLM settings",
            file=sys.stderr,
        )
    if args.record:
        if external:
            print("agentbus: --record works with the embedded stack only", file=sys.stderr)
            return 2
        env["AGENTBUS_LLM_RECORD_DIR"] = _calls_dir(args.record)
    budget = _budget(args)
    task = TaskSubmitted(task_id=new_id("tsk"), goal=goal, budget=budget, submitted_by="cli")
    telemetry = TelemetrySettings()
    provider = build_tracer_provider("cli", telemetry)
    tracer = provider.get_tracer("agentbus.cli")
    try:
        async with (
            bus(home, ALL_SERVICES, env) as (url, embedded),
            client.connect(url, provider) as broker,
        ):
            # The task's root span: every service's spans for it hang below this one.
            with tracer.start_as_current_span(
                semconv.SPAN_TASK, attributes={semconv.TASK_ID: task.task_id}
            ) as span:
                trace_id = format(span.get_span_context().trace_id, "032x")
                code = await _submit_and_follow(broker, task, home, embedded)
        _print_trace(trace_id, telemetry)
        await asyncio.to_thread(provider.shutdown)  # flush the spans
    except StackError as exc:
        print(f"agentbus: the embedded stack did not start: {exc}", file=sys.stderr)
        return 3
    if args.record:
        calls = Path(env["AGENTBUS_LLM_RECORD_DIR"]) / task.task_id
        await asyncio.to_thread(_save_recording, Path(args.record), calls, goal)
    return code


def _print_trace(trace_id: str, telemetry: TelemetrySettings) -> None:
    if telemetry.enabled:
        print(f"trace: {trace_id}  {telemetry.jaeger_ui_url.rstrip('/')}/trace/{trace_id}")
    else:
        print(f"trace: {trace_id} (not exported: set OTEL_EXPORTER_OTLP_ENDPOINT to send traces)")


def _calls_dir(record: str) -> str:
    return str(Path(record).resolve() / "calls")


def _save_recording(folder: Path, calls: Path, goal: str) -> None:
    out = folder / "transcript.json"
    try:
        out.write_text(build_transcript(calls, goal).model_dump_json(indent=1))
    except FileNotFoundError as exc:
        print(f"agentbus: nothing recorded: {exc}", file=sys.stderr)
        return
    print(f"recorded: {out} (replay with: agentbus run --replay {folder})")


async def _submit_and_follow(
    broker: NatsBroker, task: TaskSubmitted, home: Path, embedded: bool
) -> int:
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    cancel_sent = False
    await client.submit(broker, task.model_copy(update={"occurred_at": utcnow()}))
    outcome = None
    try:
        events = client.follow(broker, task.task_id, timeout=task.budget.max_wall_seconds + 60)
        async for event in events:
            if interrupted.is_set() and not cancel_sent:
                cancel_sent = True
                print("\ninterrupted: cancelling the task ...", file=sys.stderr)
                await client.submit(
                    broker,
                    TaskCancelRequested(
                        task_id=task.task_id, reason="interrupted by the user (Ctrl-C)"
                    ),
                )
            for line in render_event(event):
                print(f"[{time.monotonic() - started:6.1f}s] {line}" if line else "", flush=True)
            outcome = event
    except TimeoutError as exc:
        print(f"agentbus: {exc}", file=sys.stderr)
        return 1
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    elapsed = time.monotonic() - started
    print()
    status = "completed" if isinstance(outcome, TaskCompleted) else "did not complete"
    print(f"task {task.task_id} {status} in {elapsed:.1f}s")
    if isinstance(outcome, TaskCompleted | TaskFailed):
        print(render_usage(outcome.usage))
    if embedded:
        workspace = home / "workspaces" / task.task_id
        if workspace.exists():
            print(f"workspace: {workspace}")
        print(f"logs: {home / 'logs'}")
    print(f"history: agentbus tasks show {task.task_id}")
    if interrupted.is_set():
        return 130
    return 0 if isinstance(outcome, TaskCompleted) else 1


# --- up ------------------------------------------------------------------------------


def _parse_replicas(text: str | None) -> dict[str, int]:
    replicas = dict(ALL_SERVICES)
    for part in filter(None, (text or "").split(",")):
        name, _, count = part.partition("=")
        if name not in replicas or not count.isdigit():
            raise SystemExit(f"agentbus: bad --replicas entry {part!r} (e.g. executor=3,sandbox=2)")
        replicas[name] = int(count)
    return replicas


async def _up(args: argparse.Namespace) -> int:
    home = agentbus_home()
    if _external_nats_url():
        print(
            "agentbus: AGENTBUS_NATS_URL is set; 'up' runs the embedded stack only", file=sys.stderr
        )
        return 2
    if _running_up_stack(home):
        print(f"agentbus: a stack is already running (see {_stack_file(home)})", file=sys.stderr)
        return 2
    env, _ = _llm_env(args)
    if not env and not LLMSettings().configured:
        print(f"agentbus: {NOT_CONFIGURED_HINT}", file=sys.stderr)
        return 2
    replicas = _parse_replicas(args.replicas)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with EmbeddedStack(home=home, replicas=replicas, extra_env=env) as stack:
            _stack_file(home).write_text(
                json.dumps({"pid": os.getpid(), "nats_url": stack.nats_url})
            )
            print(f"agentbus is up: NATS {stack.nats_url}")
            for p in stack.services.processes if stack.services else []:
                print(f"  {p.name}[{p.index}]  pid {p.proc.pid:<8} {p.url}/metrics  {p.url}/readyz")
            print(f'logs in {home / "logs"}; submit with: agentbus run --task "..."; Ctrl-C stops')
            while not stop.is_set():
                stack.check_alive()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
    except StackError as exc:
        print(f"agentbus: {exc}", file=sys.stderr)
        return 3
    finally:
        _stack_file(home).unlink(missing_ok=True)
    print("agentbus stopped")
    return 0


# --- tasks ---------------------------------------------------------------------------


async def _tasks_show(args: argparse.Namespace) -> int:
    home = agentbus_home()
    try:
        async with (
            bus(home, {"memory": 1}, {}, say=False) as (url, _),
            client.connect(url) as broker,
        ):
            reply = await client.history(broker, args.task_id)
    except (StackError, RpcError) as exc:
        print(f"agentbus: {exc}", file=sys.stderr)
        return 3
    if not reply.ok or reply.task is None:
        print(f"agentbus: {reply.error or 'unknown task'}", file=sys.stderr)
        return 1
    task = reply.task
    print(f"task {task.task_id}: {task.status.value}")
    print(f"goal: {task.goal}")
    print(
        f"submitted {task.created_at:%Y-%m-%d %H:%M:%S} UTC, last change {task.updated_at:%H:%M:%S}"
    )
    print(render_usage(task.usage))
    if task.status is TaskStatus.COMPLETED and task.answer:
        print("answer: " + task.answer)
    if task.error:
        print("error: " + task.error)
    if reply.steps:
        print("\nsteps:")
        for step in reply.steps:
            detail = step.output if step.status == "completed" else step.error or ""
            print(
                f"  {step.id:<6} {step.status:<10} {step.title}" + (f": {detail}" if detail else "")
            )
    print(f"\nhistory ({len(reply.events)} events):")
    for stored in reply.events:
        try:
            lines = render_event(parse_event(stored.payload))
        except ValueError:
            lines = [f"(unknown event type {stored.type})"]
        stamp = f"{stored.occurred_at:%H:%M:%S.%f}"[:-3]
        head = f"{stamp} {stored.type:<22}"
        for i, line in enumerate(line for line in lines if line):
            print((head if i == 0 else " " * len(head)) + " " + line)
    return 0


# --- entry point ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentbus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="submit a task and follow it to its answer")
    run.add_argument("--task", help="the task, in plain words")
    run.add_argument(
        "--replay",
        metavar="PATH",
        help="replay a recorded example (dir or transcript.json) instead of calling an LLM",
    )
    run.add_argument(
        "--record", metavar="DIR", help="record the LLM calls into DIR/transcript.json for --replay"
    )
    run.add_argument("--max-steps", type=int, help="most plan steps")
    run.add_argument("--max-tokens", type=int, help="most LLM tokens")
    run.add_argument("--max-cost", type=float, help="most LLM spend in USD")
    run.add_argument("--max-time", type=float, help="wall-clock limit in seconds")
    run.set_defaults(handler=_run)

    up = sub.add_parser("up", help="run the embedded stack until Ctrl-C")
    up.add_argument("--replicas", help="replicas per service, e.g. executor=3,sandbox=2")
    up.add_argument("--replay", metavar="PATH", help="serve every task from this recorded example")
    up.set_defaults(handler=_up)

    tasks = sub.add_parser("tasks", help="look at stored tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    show = tasks_sub.add_parser("show", help="a task's summary and full event history")
    show.add_argument("task_id")
    show.set_defaults(handler=_tasks_show)
    tasks_cmd.add_parsers(sub, tasks_sub)  # tasks list, costs
    sandbox_cmd.add_parser(sub)  # sandbox exec
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(args.handler(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
