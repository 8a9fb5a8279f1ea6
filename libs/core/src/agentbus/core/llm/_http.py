"""The HTTP transport every provider adapter shares: one httpx client, the retry policy
(exponential backoff with jitter, honouring Retry-After), the mapping of HTTP,
transport and body errors to :class:`LLMError` with actionable hints, and an optional
rate gate every attempt passes (the limiter shared by all replicas; a 429's
Retry-After goes back into it so every replica slows down).

Adapters only translate between our neutral format and their wire format."""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from agentbus.contracts import ModelUsage, utcnow

from .base import ChatRequest, ChatResponse, LLMError
from .pricing import PriceTable

if TYPE_CHECKING:
    from .ratelimit import Permit

T = TypeVar("T")

# 529 is Anthropic's "overloaded"; 408/409 are worth one more try on every provider.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})

_HINTS = {
    401: "the API key was refused; check AGENTBUS_LLM_API_KEY",
    403: "the API key may not use this model; check AGENTBUS_LLM_API_KEY",
    404: "unknown model or wrong base URL; check AGENTBUS_LLM_MODEL and AGENTBUS_LLM_BASE_URL",
}


# How long every replica holds off after a 429 that gives no Retry-After.
DEFAULT_THROTTLE_S = 1.0


class RateGate(Protocol):
    """What every HTTP attempt passes when a rate limit is set
    (:class:`~agentbus.core.llm.ratelimit.SharedRateLimiter`)."""

    async def acquire(self, task_id: str | None, tokens: int) -> Permit:
        """Wait for room for one call of about ``tokens`` tokens; raises LLMError."""
        ...

    async def settle(self, permit: Permit, actual_tokens: int) -> None:
        """Count the call with the tokens it really used."""
        ...

    async def throttle(self, retry_after_s: float) -> None:
        """Hold every caller back for ``retry_after_s`` (the provider said 429)."""
        ...


def estimate_tokens(body: Mapping[str, Any], max_tokens: int) -> int:
    """A rough count of what a call will use, for rate limiting: about four characters
    a token for what is sent, plus every output token it may get (providers count a
    call's ``max_tokens`` the same way until it ends)."""
    return len(json.dumps(body, ensure_ascii=False)) // 4 + max_tokens


class RetryAfterError(LLMError):
    """A retryable HTTP error that may carry the server's Retry-After, in seconds."""

    def __init__(self, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(message, retryable=True, status=status)
        self.retry_after = retry_after


class WaitRetryAfter(wait_base):
    """Honour the server's Retry-After when it gives one (capped); else the fallback."""

    def __init__(self, fallback: wait_base, cap: float) -> None:
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, RetryAfterError) and exc.retry_after is not None:
            return min(self.cap, exc.retry_after)
        return float(self.fallback(retry_state))


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
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


def http_error(resp: httpx.Response) -> LLMError:
    """The LLMError for an HTTP error reply: retryable for 429/5xx, else with a hint."""
    detail = resp.text[:300]
    status = resp.status_code
    if status in RETRYABLE_STATUS:
        return RetryAfterError(
            f"LLM returned HTTP {status}: {detail}",
            status=status,
            retry_after=parse_retry_after(resp.headers.get("retry-after")),
        )
    hint = _HINTS.get(status, "the request was rejected")
    return LLMError(f"LLM returned HTTP {status} ({hint}): {detail}", status=status)


class HttpTransport:
    """POSTs JSON to one base URL and reads the JSON answer, retrying what may pass."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        timeout_s: float,
        max_attempts: int,
        max_wait_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateGate | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=dict(headers),
            timeout=timeout_s,
            transport=transport,
        )
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s
        self.limiter = limiter

    @property
    def base_url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    async def aclose(self) -> None:
        await self._client.aclose()

    async def post_json(
        self,
        path: str,
        body: dict[str, Any],
        read: Callable[[dict[str, Any]], T],
        *,
        task_id: str | None = None,
        tokens: int = 0,
        used: Callable[[T], int] | None = None,
    ) -> T:
        """POST ``body`` to ``path`` and return ``read(answer)``.

        ``read`` turns the decoded JSON object into the adapter's result; a KeyError,
        IndexError, TypeError or ValueError it raises means the answer is malformed.
        Timeouts, unreachable hosts, 429/5xx and malformed answers are retried with
        backoff and jitter (Retry-After wins when given); other HTTP errors are not.

        With a limiter, every attempt first waits for room for ``tokens`` (an estimate)
        on behalf of ``task_id``, and is then counted with ``used(result)``."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, LLMError) and e.retryable),
            stop=stop_after_attempt(self.max_attempts),
            wait=WaitRetryAfter(
                wait_random_exponential(multiplier=0.5, max=self.max_wait_s), self.max_wait_s
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if self.limiter is None:
                    return await self._post_once(path, body, read)
                return await self._post_gated(
                    self.limiter, path, body, read, task_id=task_id, tokens=tokens, used=used
                )
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_gated(
        self,
        gate: RateGate,
        path: str,
        body: dict[str, Any],
        read: Callable[[dict[str, Any]], T],
        *,
        task_id: str | None,
        tokens: int,
        used: Callable[[T], int] | None,
    ) -> T:
        permit = await gate.acquire(task_id, tokens)
        try:
            result = await self._post_once(path, body, read)
        except LLMError as exc:
            if exc.status == 429:
                # Before the retry policy waits: every replica now waits too.
                retry_after = exc.retry_after if isinstance(exc, RetryAfterError) else None
                await gate.throttle(DEFAULT_THROTTLE_S if retry_after is None else retry_after)
            if exc.status is not None:
                await gate.settle(permit, 0)  # refused with an HTTP error: nothing generated
            raise
        await gate.settle(permit, used(result) if used is not None else tokens)
        return result

    async def _post_once(
        self, path: str, body: dict[str, Any], read: Callable[[dict[str, Any]], T]
    ) -> T:
        try:
            resp = await self._client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise LLMError(
                f"LLM call to {self.base_url} timed out after {self.timeout_s:g} s: {exc!r}",
                retryable=True,
            ) from exc
        except httpx.TransportError as exc:
            raise LLMError(
                f"cannot reach the LLM at {self.base_url}: {exc!r}", retryable=True
            ) from exc
        if resp.status_code >= 400:
            raise http_error(resp)
        try:
            data = resp.json()
            return read(_json_object(data))
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(
                f"LLM answered with malformed JSON: {resp.text[:300]!r}", retryable=True
            ) from exc


def _billed_tokens(response: ChatResponse) -> int:
    return response.usage.prompt_tokens + response.usage.completion_tokens


def _json_object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"expected a JSON object, got {type(data).__name__}")
    return data


class HttpProvider(abc.ABC):
    """What every HTTP provider adapter shares: the transport, the model and the price
    table. An adapter says where to post and how to authenticate, and translates the
    request and the answer of its wire format."""

    name: str
    path: str

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
        limiter: RateGate | None = None,
    ) -> None:
        self._http = HttpTransport(
            self._root(base_url),
            headers=self._headers(api_key),
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            max_wait_s=max_wait_s,
            transport=transport,
            limiter=limiter,
        )
        self.model = model
        self.prices = prices

    @property
    def base_url(self) -> str:
        return self._http.base_url

    async def aclose(self) -> None:
        await self._http.aclose()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        body = self._body(request)
        gated = self._http.limiter is not None
        return await self._http.post_json(
            self.path,
            body,
            lambda data: self._read(request, data),
            task_id=request.task_id,
            tokens=estimate_tokens(body, request.max_tokens) if gated else 0,
            used=_billed_tokens,
        )

    def _root(self, base_url: str) -> str:
        return base_url

    def _priced(
        self, answered: object, request: ChatRequest, usage: ModelUsage
    ) -> tuple[str, ModelUsage]:
        """The model that answered (else the one asked for) and the usage with its cost."""
        model = str(answered or request.model or self.model)
        return model, usage.model_copy(update={"cost_usd": self.prices.cost(model, usage)})

    @abc.abstractmethod
    def _headers(self, api_key: str | None) -> dict[str, str]: ...

    @abc.abstractmethod
    def _body(self, request: ChatRequest) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _read(self, request: ChatRequest, data: dict[str, Any]) -> ChatResponse: ...
