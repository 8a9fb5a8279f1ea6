"""How events look to a person following a task."""

from __future__ import annotations

import re
import textwrap

from agentbus.contracts import (
    BudgetExhausted,
    BudgetFigure,
    BudgetWarning,
    Event,
    PlanCreated,
    StepCompleted,
    StepFailed,
    StepPaused,
    StepReady,
    StepToolCalled,
    TaskApproved,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskPaused,
    TaskResumed,
    TaskSubmitted,
    Usage,
)
from agentbus.core.budget import amount


def _short(text: str, width: int = 100, lines: int = 3) -> list[str]:
    out: list[str] = []
    for raw in text.strip().splitlines() or [""]:
        out += textwrap.wrap(raw, width) or [""]
        if len(out) >= lines:
            break
    extra = len(text.strip().splitlines()) > lines
    return out[:lines] + (["..."] if extra else [])


_PROTOCOL_LINE = re.compile(r"^(exit code: \S+|outcome: \S+|stdout:|stderr:)$")


def _tool_output(text: str) -> str:
    """A tool result without the lines addressed to the model (exit code, outcome)."""
    kept = [line for line in text.splitlines() if not _PROTOCOL_LINE.match(line)]
    return "\n".join(kept)


def render_figure(figure: BudgetFigure) -> str:
    share = figure.used / figure.limit if figure.limit else 0.0
    used, limit = amount(figure.kind, figure.used), amount(figure.kind, figure.limit)
    return f"{figure.kind.value} {used} of {limit} ({share:.0%})"


def _approval(event: TaskApproved) -> str:
    adds = {
        "cost": f"+${event.add_cost_usd:.4f}" if event.add_cost_usd else "",
        "tokens": f"+{event.add_tokens:,}" if event.add_tokens else "",
        "calls": f"+{event.add_llm_calls}" if event.add_llm_calls else "",
        "cpu": f"+{event.add_sandbox_cpu_seconds:g} s" if event.add_sandbox_cpu_seconds else "",
        "time": f"+{event.add_wall_seconds:g} s" if event.add_wall_seconds else "",
    }
    given = ", ".join(f"{k} {v}" for k, v in adds.items() if v) or "no extra budget"
    return f"approved by {event.approved_by}: {given}; resuming"


def render_event(event: Event) -> list[str]:  # noqa: PLR0912 - one case per event type
    """Lines to print for one event (empty for events a person need not see)."""
    match event:
        case TaskSubmitted():
            return [f"task {event.task_id} submitted: {event.goal}"]
        case PlanCreated():
            head = "plan" if event.revision == 1 else f"new plan (revision {event.revision})"
            lines = [f"{head}: {len(event.steps)} step(s)"]
            for s in event.steps:
                after = f"  (after {', '.join(s.depends_on)})" if s.depends_on else ""
                lines.append(f"  {s.id}  {s.title}{after}")
            return lines
        case StepReady():
            return [f"> {event.step.id} started: {event.step.title}"]
        case StepToolCalled():
            mark = "ok" if event.outcome == "ok" else "error"
            lines = [f"  {event.step_id} . {event.tool} [{mark}, {event.duration_ms:.0f} ms]"]
            lines += [f"      $ {line}" for line in _short(event.summary, 96, 2)]
            lines += [f"      | {line}" for line in _short(_tool_output(event.output), 96, 4)]
            return lines
        case StepCompleted():
            return [f"v {event.step_id} done: " + " / ".join(_short(event.output, 90, 2))]
        case StepFailed():
            return [f"x {event.step_id} failed: {event.error}"]
        case TaskCompleted():
            lines = ["", "answer:"] + [f"  {line}" for line in event.answer.strip().splitlines()]
            if event.artifacts:
                lines.append("files: " + ", ".join(event.artifacts))
            return lines
        case TaskFailed():
            return ["", f"task failed: {event.reason}"]
        case StepPaused():
            return [f"|| {event.step_id} paused: {event.reason}"]
        case BudgetWarning():
            return [f"! budget warning: {render_figure(event.figure)} spent"]
        case BudgetExhausted():
            lines = [f"! budget exhausted: {event.reason}"]
            if event.approval_deadline is not None:
                lines.append(
                    f"  the task fails at {event.approval_deadline:%H:%M:%S} UTC unless approved"
                )
            return lines
        case TaskApproved():
            return [_approval(event)]
        case TaskPaused():
            return ["|| task paused: awaiting approval"]
        case TaskResumed():
            return ["task resumed"]
        case TaskCancelRequested():
            return [f"cancel requested: {event.reason}"]
        case TaskCancelled():
            return [f"task cancelled: {event.reason}"]
    return []


def render_usage(usage: Usage) -> str:
    t = usage.total
    models = ", ".join(sorted(usage.by_model)) or "none"
    return (
        f"tokens: {t.prompt_tokens} in / {t.completion_tokens} out "
        f"({t.calls} LLM calls; models: {models})  cost: ${t.cost_usd:.4f}"
    )
