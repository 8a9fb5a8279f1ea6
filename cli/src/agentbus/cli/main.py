"""``agentbus``: run tasks, run the stack, look at stored tasks.

With no AGENTBUS_NATS_URL configured, commands use the stack started by ``agentbus up``
when one is running, and otherwise start the embedded stack for their own run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from pathlib import Path

from faststream.nats import NatsBroker

from agentbus.contracts import (
    Budget,
    OnBudget,
    TaskApproved,
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
from agentbus.core.llm import NOT_CONFIGURED_HINT, LLMError, build_transcript
from agentbus.core.llm.replay import load_transcripts
from agentbus.core.ports import RpcError
from agentbus.core.settings import LLMSettings, TelemetrySettings
from agentbus.core.tracing import build_tracer_provider

from . import client, doctor, keys_cmd, local_gateway, sandbox_cmd, tasks_cmd
from .locate import (
    agentbus_home,
    announced,
    bus,
    external_database_url,
    external_nats_url,
    live_stack,
    run_file,
    running_up_stack,
    stack_file,
)
from .render import render_event, render_usage
from .stack import EmbeddedStack, StackError

ALL_SERVICES = dict.fromkeys(subjects.SERVICES, 1)


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")
_UNIT_S = {"h": 3600, "m": 60, "s": 1, "": 1}


def duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``10m``, ``1h30m``."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 10m, 1h30m)")
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


_BUDGET_FLAGS = {
    "max_steps": "max_steps",
    "max_tokens": "max_tokens",
    "max_cost": "max_cost_usd",
    "max_time": "max_wall_seconds",
    "max_calls": "max_llm_calls",
    "max_cpu": "max_sandbox_cpu_seconds",
    "on_budget": "on_exhausted",
    "approval_timeout": "approval_timeout_s",
}


def _budget(args: argparse.Namespace) -> Budget:
    fields = {
        field: getattr(args, flag)
        for flag, field in _BUDGET_FLAGS.items()
        if getattr(args, flag) is not None
    }
    return Budget.model_validate(fields)


async def _run(args: argparse.Namespace) -> int:
    home = agentbus_home()
    env, recorded_goal = _llm_env(args)
    goal = args.task or recorded_goal
    if not goal:
        print('agentbus: give the task with --task "..."', file=sys.stderr)
        return 2
    external = external_nats_url() or running_up_stack(home)
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
    try:
        budget = _budget(args)
    except ValueError as exc:
        print(f"agentbus: bad budget: {exc}", file=sys.stderr)
        return 2
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
                with (
                    announced(run_file(home, task.task_id), url)
                    if embedded
                    else contextlib.nullcontext()
                ):
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
        # A paused task may wait for approval as long as its approval timeout allows.
        waiting = task.budget.approval_timeout_s or 24 * 3600
        events = client.follow(
            broker, task.task_id, timeout=task.budget.max_wall_seconds + waiting + 60
        )
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
    if external_nats_url():
        print(
            "agentbus: AGENTBUS_NATS_URL is set; 'up' runs the embedded stack only", file=sys.stderr
        )
        return 2
    if running_up_stack(home):
        print(f"agentbus: a stack is already running (see {stack_file(home)})", file=sys.stderr)
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
        async with EmbeddedStack(
            home=home, replicas=replicas, extra_env=env, database_url=external_database_url()
        ) as stack:
            nats_url = stack.nats_url or ""
            key = await local_gateway.local_key(nats_url, home)
            stack_env = stack.services.env if stack.services else {}
            gateway = await local_gateway.start_gateway(stack_env, home, nats_url)
            with announced(stack_file(home), nats_url):
                print(f"agentbus is up: NATS {nats_url}")
                for p in [
                    *(stack.services.processes if stack.services else []),
                    *gateway.processes,
                ]:
                    urls = f"{p.url}/metrics  {p.url}/readyz"
                    print(f"  {p.name}[{p.index}]  pid {p.proc.pid:<8} {urls}")
                print(f"gateway: {gateway.processes[0].url}  (HTTP API: /v1, /openapi.json)")
                print(
                    f"API key of tenant '{local_gateway.LOCAL_TENANT}': {key}"
                    f"  (kept in {local_gateway.key_file(home)})"
                )
                print(
                    f'logs in {home / "logs"}; submit with: agentbus run --task "..."; Ctrl-C stops'
                )
                try:
                    while not stop.is_set():
                        stack.check_alive()
                        gateway.check_alive()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=1.0)
                finally:
                    await asyncio.to_thread(gateway.stop)
    except StackError as exc:
        print(f"agentbus: {exc}", file=sys.stderr)
        return 3
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


# --- cancel / approve ----------------------------------------------------------------


async def _publish(event: TaskCancelRequested | TaskApproved) -> int:
    """Publish a control event to the stack running the task (any client may)."""
    home = agentbus_home()
    url = external_nats_url() or running_up_stack(home) or live_stack(run_file(home, event.task_id))
    if not url:
        print(
            "agentbus: no running stack: set AGENTBUS_NATS_URL or start one with 'agentbus up'",
            file=sys.stderr,
        )
        return 3
    async with client.connect(url) as broker:
        await client.submit(broker, event)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    code = await _publish(TaskCancelRequested(task_id=args.task_id, reason=args.reason))
    if code == 0:
        print(f"cancel requested for {args.task_id}; see: agentbus tasks show {args.task_id}")
    return code


async def _approve(args: argparse.Namespace) -> int:
    event = TaskApproved(
        task_id=args.task_id,
        add_cost_usd=args.add_cost or 0,
        add_tokens=args.add_tokens or 0,
        add_llm_calls=args.add_calls or 0,
        add_sandbox_cpu_seconds=args.add_cpu or 0,
        add_wall_seconds=args.add_time or 0,
        approved_by=args.by or os.environ.get("USER") or "cli",
    )
    code = await _publish(event)
    if code == 0:
        print(f"approved {args.task_id}: it resumes where it stopped")
    return code


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
    run.add_argument("--max-cost", type=float, help="most LLM spend in USD, e.g. 0.50")
    run.add_argument("--max-time", type=duration, help="wall-clock limit, e.g. 90s, 10m, 1h")
    run.add_argument("--max-calls", type=int, help="most LLM calls")
    run.add_argument("--max-cpu", type=float, help="most sandbox CPU-seconds")
    run.add_argument(
        "--on-budget",
        choices=[p.value for p in OnBudget],
        help="when a budget runs out: pause for approval or fail (default: the platform's)",
    )
    run.add_argument(
        "--approval-timeout", type=duration, help="how long a paused task waits, e.g. 30m"
    )
    run.set_defaults(handler=_run)

    cancel = sub.add_parser("cancel", help="stop a task: no new steps or LLM calls")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason", default="cancelled by the user", help="why")
    cancel.set_defaults(handler=_cancel)

    approve = sub.add_parser("approve", help="let a task paused by its budget go on")
    approve.add_argument("task_id")
    approve.add_argument("--add-cost", type=float, help="USD to add to the cost budget")
    approve.add_argument("--add-tokens", type=int, help="tokens to add")
    approve.add_argument("--add-calls", type=int, help="LLM calls to add")
    approve.add_argument("--add-cpu", type=float, help="sandbox CPU-seconds to add")
    approve.add_argument("--add-time", type=duration, help="time to add, e.g. 10m")
    approve.add_argument("--by", help="who approves (default: $USER)")
    approve.set_defaults(handler=_approve)

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
    keys_cmd.add_parser(sub)  # keys create, list, revoke
    doctor.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = asyncio.run(args.handler(args))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
