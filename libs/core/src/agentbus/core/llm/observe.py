"""Every LLM call as a span (OpenTelemetry GenAI conventions) and in metrics: calls,
tokens and cost by model and outcome, and call latency."""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider
from prometheus_client import CollectorRegistry, Counter, Histogram

from .. import semconv
from .base import ChatRequest, ChatResponse, LLMError, LLMProvider


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "role")
        self.calls = Counter(
            "agentbus_llm_calls", "LLM calls.", (*labels, "outcome"), registry=registry
        )
        self.tokens = Counter(
            "agentbus_llm_tokens", "LLM tokens.", (*labels, "kind"), registry=registry
        )
        self.cost = Counter("agentbus_llm_cost_usd", "LLM spend in USD.", labels, registry=registry)
        self.seconds = Histogram(
            "agentbus_llm_call_seconds",
            "LLM call latency.",
            labels,
            registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )


class ObservedProvider:
    """Wraps a provider; the conversation and task id go on the span too."""

    def __init__(
        self,
        inner: LLMProvider,
        *,
        role: str,
        tracer_provider: TracerProvider | None = None,
        metrics: LLMMetrics | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.role = role
        self.metrics = metrics
        self._tracer = trace.get_tracer("agentbus.llm", tracer_provider=tracer_provider)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        model = request.model or str(getattr(self.inner, "model", "") or self.inner.name)
        attributes: dict[str, str | int] = {
            semconv.GEN_AI_OPERATION_NAME: "chat",
            semconv.GEN_AI_SYSTEM: self.inner.name,
            semconv.GEN_AI_REQUEST_MODEL: model,
            semconv.GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens,
            semconv.CONVERSATION: request.conversation,
        }
        if request.task_id:
            attributes[semconv.TASK_ID] = request.task_id
        started = time.perf_counter()
        with self._tracer.start_as_current_span(
            semconv.span_llm("chat", model), kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                response = await self.inner.chat(request)
            except LLMError as exc:
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                span.set_attribute(semconv.ERROR_TYPE, str(exc.status or type(exc).__name__))
                self._count(model, "error", time.perf_counter() - started)
                raise
            usage = response.usage
            if not request.model:  # the provider chose: name the span after what answered
                span.update_name(semconv.span_llm("chat", response.model))
            span.set_attributes(
                {
                    semconv.GEN_AI_RESPONSE_MODEL: response.model,
                    semconv.GEN_AI_USAGE_INPUT_TOKENS: usage.prompt_tokens,
                    semconv.GEN_AI_USAGE_OUTPUT_TOKENS: usage.completion_tokens,
                    semconv.GEN_AI_RESPONSE_FINISH_REASONS: [response.finish_reason],
                    semconv.COST_USD: usage.cost_usd,
                }
            )
        self._count(response.model, "ok", time.perf_counter() - started, response)
        return response

    def _count(
        self, model: str, outcome: str, seconds: float, response: ChatResponse | None = None
    ) -> None:
        if self.metrics is None:
            return
        m, role = self.metrics, self.role
        m.calls.labels(model, role, outcome).inc()
        m.seconds.labels(model, role).observe(seconds)
        if response is not None:
            usage = response.usage
            m.tokens.labels(model, role, "input").inc(usage.prompt_tokens)
            m.tokens.labels(model, role, "output").inc(usage.completion_tokens)
            m.tokens.labels(model, role, "cached").inc(usage.cached_tokens)
            m.cost.labels(model, role).inc(usage.cost_usd)
