"""Span names and attribute keys, in one place (as the OpenTelemetry demo keeps its
telemetry schema). Ours are namespaced ``agentbus.*``; LLM calls follow the
OpenTelemetry GenAI semantic conventions (``gen_ai.*``)."""

from __future__ import annotations

from typing import Final

# --- our attributes ------------------------------------------------------------------
TASK_ID: Final = "agentbus.task_id"
STEP_ID: Final = "agentbus.step_id"
SERVICE: Final = "agentbus.service"
COST_USD: Final = "agentbus.cost_usd"
CONVERSATION: Final = "agentbus.llm.conversation"
TOOL_NAME: Final = "agentbus.tool.name"
TOOL_OUTCOME: Final = "agentbus.tool.outcome"
SANDBOX_LANGUAGE: Final = "agentbus.sandbox.language"
SANDBOX_EXIT_CODE: Final = "agentbus.sandbox.exit_code"
SANDBOX_OUTCOME: Final = "agentbus.sandbox.outcome"
MEMORY_OPERATION: Final = "agentbus.memory.operation"
MEMORY_HITS: Final = "agentbus.memory.hits"

# --- GenAI semantic conventions -------------------------------------------------------
GEN_AI_SYSTEM: Final = "gen_ai.system"
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
ERROR_TYPE: Final = "error.type"

# --- span names -----------------------------------------------------------------------
SPAN_TASK: Final = "agentbus.task"
SPAN_STEP: Final = "agentbus.step"
SPAN_TOOL: Final = "agentbus.tool"
SPAN_SANDBOX_EXEC: Final = "agentbus.sandbox.exec"
SPAN_MEMORY: Final = "agentbus.memory"


def span_llm(operation: str, model: str) -> str:
    """GenAI convention: ``{gen_ai.operation.name} {gen_ai.request.model}``."""
    return f"{operation} {model}".strip()
