"""An LLM provider (``agentbus.core.llm.LLMProvider``) that plays a script in process:
each call takes the next turn, a reply message or an exception to raise; it records the
requests. ``hold`` makes the next call wait (signalling ``waiting``) until it is set."""

from __future__ import annotations

import asyncio
from typing import Any

from agentbus.contracts import ModelUsage
from agentbus.core.llm import ChatRequest, ChatResponse, Message, ToolCall

Turn = Message | BaseException


def tool_turn(*calls: tuple[str, dict[str, Any]]) -> Message:
    """An assistant turn calling ``(name, arguments)`` tools, in order."""
    return Message(
        role="assistant",
        tool_calls=[
            ToolCall(id=f"call_{i}", name=name, arguments=args)
            for i, (name, args) in enumerate(calls)
        ],
    )


def finish(result: str, *, success: bool = True) -> Message:
    """An assistant turn ending the step with ``result``."""
    return tool_turn(("finish_step", {"result": result, "success": success}))


class ScriptedModel:
    name = "scripted"

    def __init__(self, *turns: Turn, model: str = "scripted-1") -> None:
        self.turns = list(turns)
        self.model = model
        self.requests: list[ChatRequest] = []
        self.hold: asyncio.Event | None = None
        self.waiting = asyncio.Event()
        self.closed = False

    async def chat(self, request: ChatRequest) -> ChatResponse:
        self.requests.append(request)
        if self.hold is not None:
            self.waiting.set()
            await self.hold.wait()
        if not self.turns:
            raise AssertionError(f"no scripted turn left for call {len(self.requests)}")
        turn = self.turns.pop(0)
        if isinstance(turn, BaseException):
            raise turn
        usage = ModelUsage(calls=1, prompt_tokens=100, completion_tokens=10)
        return ChatResponse(message=turn, usage=usage, model=self.model)

    async def aclose(self) -> None:
        self.closed = True
