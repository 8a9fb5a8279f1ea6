"""OpenAI-compatible chat completions over httpx (OpenAI, vLLM, Ollama, llama.cpp, LM Studio)."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from agentbus.contracts import ModelUsage, utcnow

from .base import ChatRequest, ChatResponse, LLMError, Message, ToolCall
from .pricing import PriceTable

_RETRYABLE = {408, 409, 429, 500, 502, 503, 504, 529}


class _RetryAfterError(LLMError):
    def __init__(self, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(message, retryable=True, status=status)
        self.retry_after = retry_after


class _WaitRetryAfter(wait_base):
    """Honour the server's Retry-After when it gives one; else exponential with jitter."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: Any) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, _RetryAfterError) and exc.retry_after is not None:
            return min(self.cap, exc.retry_after)
        return float(self.fallback(retry_state))


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None


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


class OpenAIProvider:
    """``POST {base_url}/chat/completions`` with tools and usage; retries 429/5xx."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        model: str,
        prices: PriceTable,
        timeout_s: float = 120,
        max_attempts: int = 4,
        max_wait_s: float = 30,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )
        self.model = model
        self.prices = prices
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s

    async def aclose(self) -> None:
        await self._client.aclose()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, LLMError) and e.retryable),
            stop=stop_after_attempt(self.max_attempts),
            wait=_WaitRetryAfter(
                wait_random_exponential(multiplier=0.5, max=self.max_wait_s), self.max_wait_s
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._chat_once(request)
        raise AssertionError("unreachable")  # pragma: no cover

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

    async def _chat_once(self, request: ChatRequest) -> ChatResponse:
        try:
            resp = await self._client.post("/chat/completions", json=self._body(request))
        except httpx.TimeoutException as exc:
            raise LLMError(f"LLM call timed out: {exc!r}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise LLMError(
                f"cannot reach the LLM at {self._client.base_url}: {exc!r}", retryable=True
            ) from exc
        if resp.status_code >= 400:
            raise self._http_error(resp)
        try:
            data = resp.json()
            choice = data["choices"][0]
            raw = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(
                f"LLM answered with malformed JSON: {resp.text[:300]!r}", retryable=True
            ) from exc
        usage_raw = data.get("usage") or {}
        details = usage_raw.get("prompt_tokens_details") or {}
        usage = ModelUsage(
            prompt_tokens=int(usage_raw.get("prompt_tokens") or 0),
            completion_tokens=int(usage_raw.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            calls=1,
        )
        model = str(data.get("model") or request.model or self.model)
        usage = usage.model_copy(update={"cost_usd": self.prices.cost(model, usage)})
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

    def _http_error(self, resp: httpx.Response) -> LLMError:
        detail = resp.text[:300]
        status = resp.status_code
        if status in _RETRYABLE:
            return _RetryAfterError(
                f"LLM returned HTTP {status}: {detail}",
                status=status,
                retry_after=_parse_retry_after(resp.headers.get("retry-after")),
            )
        hint = {
            401: "the API key was refused; check AGENTBUS_LLM_API_KEY",
            403: "the API key may not use this model; check AGENTBUS_LLM_API_KEY",
            404: "unknown model or wrong base URL; "
            "check AGENTBUS_LLM_MODEL and AGENTBUS_LLM_BASE_URL",
        }.get(status, "the request was rejected")
        return LLMError(f"LLM returned HTTP {status} ({hint}): {detail}", status=status)
