"""OpenTelemetry set-up. Tracer providers are passed in, so tests inject their own."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from .settings import TelemetrySettings


def build_tracer_provider(
    service: str, settings: TelemetrySettings | None = None
) -> TracerProvider:
    """A provider that exports over OTLP/HTTP when an endpoint is configured, else nowhere."""
    settings = settings or TelemetrySettings()
    provider = TracerProvider(resource=Resource.create({"service.name": f"agentbus-{service}"}))
    if settings.enabled:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
