"""Settings shared by every service. Each service composes these into its own
``Settings(BaseSettings)`` with its own env prefix; nothing is read at import time."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class BusSettings(BaseSettings):
    """How to reach NATS and how hard to retry. Env prefix ``AGENTBUS_``."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_", extra="ignore")

    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        validation_alias=AliasChoices("AGENTBUS_NATS_URL", "NATS_URL"),
        description="NATS server URL(s), comma-separated.",
    )
    max_deliver: int = Field(5, ge=1, description="Attempts per event before dead-lettering.")
    ack_wait_s: float = Field(
        60, gt=0, description="Seconds before an unacked event is redelivered."
    )
    retry_backoff_s: float = Field(
        0.5, ge=0, description="First redelivery delay; doubles per try."
    )
    rpc_timeout_s: float = Field(10, gt=0, description="Default request/reply timeout.")
    events_max_age_days: float = Field(
        30, gt=0, description="How long the event stream keeps events."
    )
    duplicate_window_s: float = Field(120, gt=0, description="JetStream de-duplication window.")

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]


class LogSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_LOG_", extra="ignore")

    level: str = Field("INFO", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="json when not on a terminal, console on one."
    )


class LLMSettings(BaseSettings):
    """Which LLM to talk to. Env prefix ``AGENTBUS_LLM_``.

    ``provider`` defaults to ``openai`` when a base URL is set and to ``replay`` when a
    replay file is set; with neither, no LLM is configured. ``anthropic`` is only used
    when asked for, and then the base URL defaults to Anthropic's public API.
    """

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_LLM_", extra="ignore")

    provider: Literal["openai", "anthropic", "replay", ""] = Field(
        "", description="openai (any OpenAI-compatible endpoint) | anthropic | replay."
    )
    base_url: str = Field(
        "",
        description="OpenAI-compatible base URL, e.g. http://host:8000/v1; for anthropic the "
        "API root, with or without /v1 (default https://api.anthropic.com).",
    )
    api_key: SecretStr | None = Field(None, description="API key for the provider.")
    model: str = Field("", description="Model name for every call unless overridden.")
    planner_model: str = Field("", description="Model for planning (defaults to model).")
    executor_model: str = Field("", description="Model for steps (defaults to model).")
    replay_file: Path | None = Field(None, description="Recorded transcript to replay.")
    record_dir: Path | None = Field(
        None, description="Record every LLM call here in the replay format."
    )
    timeout_s: float = Field(120, gt=0, description="Timeout of one LLM call.")
    max_tokens: int = Field(2048, gt=0, description="Most output tokens per call.")
    prices_file: Path | None = Field(None, description="JSON price table (USD per 1M tokens).")
    rpm: int | None = Field(
        None,
        ge=0,
        description="Requests per minute to this provider and API key, shared by all "
        "replicas of all services; unset or 0 = no limit.",
    )
    tpm: int | None = Field(
        None,
        ge=0,
        description="Tokens (prompt + output) per minute to this provider and API key, "
        "shared by all replicas; a call counts its max_tokens until it ends. Unset or "
        "0 = no limit.",
    )
    rate_limit_max_wait_s: float = Field(
        60,
        ge=0,
        description="Longest a call waits for the RPM/TPM limit (or a provider's "
        "Retry-After) before it fails.",
    )

    def model_for(self, role: Literal["planner", "executor"]) -> str:
        """The model a role asks for: its own if set, else ``model``."""
        return (self.planner_model if role == "planner" else self.executor_model) or self.model

    @property
    def resolved_provider(self) -> str:
        if self.provider:
            return self.provider
        if self.replay_file:
            return "replay"
        if self.base_url:
            return "openai"
        return ""

    @property
    def configured(self) -> bool:
        return bool(self.resolved_provider)


class TelemetrySettings(BaseSettings):
    """Tracing follows the standard OTEL_* variables; off when no endpoint is set."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    exporter_otlp_endpoint: str = Field(
        "", description="OTLP/HTTP endpoint, e.g. http://jaeger:4318."
    )
    exporter_otlp_traces_endpoint: str = Field("", description="Traces-only endpoint (full path).")
    sdk_disabled: bool = Field(False, description="Turn tracing off entirely.")
    jaeger_ui_url: str = Field(
        "http://localhost:16686",
        validation_alias="AGENTBUS_JAEGER_UI_URL",
        description="Where people open traces; the CLI prints links to it.",
    )

    @property
    def enabled(self) -> bool:
        return not self.sdk_disabled and bool(
            self.exporter_otlp_endpoint or self.exporter_otlp_traces_endpoint
        )


class HttpSettings(BaseSettings):
    """The service's HTTP endpoint: /metrics (Prometheus), /healthz, /readyz.
    Off when the port is 0 (the default for the embedded stack)."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_HTTP_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in containers).")
    port: int = Field(0, ge=0, le=65535, description="Port; 0 turns the endpoint off.")


class CommonSettings(BaseSettings):
    """What every service needs; services subclass this with their own env prefix."""

    model_config = SettingsConfigDict(extra="ignore")

    bus: BusSettings = Field(default_factory=BusSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
