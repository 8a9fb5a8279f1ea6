"""OpenAI-compatible chat completions over httpx (OpenAI, vLLM, Ollama, llama.cpp, LM Studio)."""

from __future__ import annotations

import json
from typing import Any

from agentbus.contracts import ModelUsage

from ._http import HttpProvider
from .base import ChatRequest, ChatResponse, Message, ToolCall


def _to_wire(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _parse_tool_call(raw: dict[str, Any]) -> ToolCall:
    fn = raw.get("function") or {}
    args_text = fn.get("arguments") or "{}"
    try:
        args = json.loads(args_text) if isinstance(args_text, str) else dict(args_text)
    except json.JSONDecodeError:
        # Hand the raw text to the caller; the tool loop reports it back to the model.
        args = {"_invalid_json": args_text}
    if not isinstance(args, dict):
        args = {"_invalid_json": args_text}
    return ToolCall(id=str(raw.get("id") or ""), name=str(fn.get("name") or ""), arguments=args)


class OpenAIProvider(HttpProvider):
    """``POST {base_url}/chat/completions`` with tools and usage; retries 429/5xx."""

    name = "openai"
    path = "/chat/completions"

    def _headers(self, api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [_to_wire(m) for m in request.messages],
            "max_tokens": request.max_tokens,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        if request.json_output:
            body["response_format"] = {"type": "json_object"}
        return body

    def _read(self, request: ChatRequest, data: dict[str, Any]) -> ChatResponse:
        choice = data["choices"][0]
        raw = choice["message"]
        usage_raw = data.get("usage") or {}
        details = usage_raw.get("prompt_tokens_details") or {}
        usage = ModelUsage(
            prompt_tokens=int(usage_raw.get("prompt_tokens") or 0),
            completion_tokens=int(usage_raw.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            calls=1,
        )
        model, usage = self._priced(data.get("model"), request, usage)
        message = Message(
            role="assistant",
            content=raw.get("content"),
            tool_calls=[_parse_tool_call(c) for c in raw.get("tool_calls") or []],
        )
        return ChatResponse(
            message=message,
            usage=usage,
            model=model,
            finish_reason=str(choice.get("finish_reason") or ""),
        )
