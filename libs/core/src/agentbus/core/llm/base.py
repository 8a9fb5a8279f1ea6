"""The provider interface: one neutral chat format, adapters translate to each wire format."""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agentbus.contracts import ModelUsage


class ToolCall(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    description: str
    parameters: dict[str, Any]


class ChatRequest(BaseModel):
    """One LLM call. ``conversation`` is a stable key for the dialogue this call belongs
    to (``planner/plan``, ``executor/s2``): the replay provider finds its script by it and
    traces group calls by it. It must not contain ids that change between runs."""

    messages: list[Message]
    tools: list[ToolSpec] = Field(default_factory=list)
    model: str = ""
    max_tokens: int = 2048
    temperature: float | None = None
    json_output: bool = False
    conversation: str = ""
    task_id: str | None = None
    step_id: str | None = None


class ChatResponse(BaseModel):
    message: Message
    usage: ModelUsage
    model: str
    finish_reason: str = ""


class LLMError(Exception):
    """An LLM call failed. ``retryable`` tells whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@runtime_checkable
class LLMProvider(Protocol):
    name: str

    async def chat(self, request: ChatRequest) -> ChatResponse: ...

    async def aclose(self) -> None: ...
