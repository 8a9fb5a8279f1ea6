"""The executor's domain: the tool loop and the tools' contracts (no I/O imports)."""

from .loop import StepResult, StepRunner, ToolEvent, clip
from .tools import ExecResult, Workspace, tool_specs

__all__ = ["ExecResult", "StepResult", "StepRunner", "ToolEvent", "Workspace", "clip", "tool_specs"]
