"""How events look to a person following a task."""

from __future__ import annotations

import re
import textwrap

from agentbus.contracts import (
    Event,
    PlanCreated,
    StepCompleted,
    StepFailed,
    StepReady,
    StepToolCalled,
    TaskCancelled,
    TaskCancelRequested,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    Usage,
)


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


def render_event(event: Event) -> list[str]:
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
