"""Anthropic Messages API over httpx: ``POST {base_url}/v1/messages``.

The translation from our neutral format:

* system messages are joined into the top-level ``system`` string (``json_output``
  appends an instruction there, as the API has no response format switch);
* assistant tool calls become ``tool_use`` content blocks;
* our ``role="tool"`` messages become ``tool_result`` blocks in a user message;
* consecutive messages of the same role are merged into one, as the API requires
  user and assistant turns to alternate, so the results of several tool calls go back
  in ONE user message (``tool_result`` blocks first, as the API expects).

Usage: Anthropic's ``input_tokens`` excludes the tokens read from and written to the
prompt cache, so ``prompt_tokens`` is the sum of all three and ``cached_tokens`` the
cache reads, which is how :meth:`PriceTable.cost` prices them.
"""

from __future__ import annotations

from typing import Any

from agentbus.contracts import ModelUsage

from ._http import HttpProvider
from .base import ChatRequest, ChatResponse, Message, ToolCall

ANTHROPIC_API_URL = "https://api.anthropic.com"
# Pinned: a newer version may change the wire format under us.
ANTHROPIC_VERSION = "2023-06-01"
JSON_INSTRUCTION = (
    "Answer with one JSON object and nothing else: no prose, no code fences, no comments."
)


def _blocks(message: Message) -> list[dict[str, Any]]:
    """The content blocks of one non-system message (empty text is never sent)."""
    if message.role == "tool":
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id or ""}
        if message.content:
            block["content"] = message.content
        return [block]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    blocks += [
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        for call in message.tool_calls
    ]
    return blocks


def to_wire(messages: list[Message]) -> tuple[str, list[dict[str, Any]]]:
    """The ``system`` string and the alternating ``messages`` list for our messages."""
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        # A user turn answering tool calls must start with the tool_result blocks.
        turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return system, turns


class AnthropicProvider(HttpProvider):
    """``POST {base_url}/v1/messages`` with tools and usage; retries 429/5xx/529.

    ``base_url`` is the API root, ``https://api.anthropic.com``; a trailing ``/v1`` is
    accepted too, so both spellings reach ``/v1/messages``."""

    name = "anthropic"
    path = "/v1/messages"

    def _root(self, base_url: str) -> str:
        return (base_url or ANTHROPIC_API_URL).rstrip("/").removesuffix("/v1")

    def _headers(self, api_key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        system, messages = to_wire(request.messages)
        if request.json_output:
            system = f"{system}\n\n{JSON_INSTRUCTION}" if system else JSON_INSTRUCTION
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
        return body

    def _read(self, request: ChatRequest, data: dict[str, Any]) -> ChatResponse:
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in data["content"]:
            if block["type"] == "text":
                texts.append(str(block["text"]))
            elif block["type"] == "tool_use":
                args = block.get("input") or {}
                if not isinstance(args, dict):
                    args = {"_invalid_json": args}
                calls.append(ToolCall(id=str(block["id"]), name=str(block["name"]), arguments=args))
            # Other blocks (thinking, ...) are not part of our neutral format.
        raw = data.get("usage") or {}
        cache_read = int(raw.get("cache_read_input_tokens") or 0)
        cache_write = int(raw.get("cache_creation_input_tokens") or 0)
        usage = ModelUsage(
            prompt_tokens=int(raw.get("input_tokens") or 0) + cache_read + cache_write,
            completion_tokens=int(raw.get("output_tokens") or 0),
            cached_tokens=cache_read,
            calls=1,
        )
        model, usage = self._priced(data.get("model"), request, usage)
        message = Message(
            role="assistant", content="".join(texts) if texts else None, tool_calls=calls
        )
        return ChatResponse(
            message=message,
            usage=usage,
            model=model,
            finish_reason=str(data.get("stop_reason") or ""),
        )
