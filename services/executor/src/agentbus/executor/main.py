"""Executor service entry point: ``python -m agentbus.executor`` or ``agentbus-executor``."""

from __future__ import annotations

from faststream import FastStream
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.llm import build_provider
from agentbus.core.llm.observe import LLMMetrics, ObservedProvider
from agentbus.core.service import Service, run
from agentbus.core.settings import CommonSettings, LLMSettings

from .handlers import ExecutorDeps, register


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_EXECUTOR_", extra="ignore")

    llm: LLMSettings = Field(default_factory=LLMSettings)
    max_iterations: int = Field(20, ge=1, description="Most LLM turns per step.")
    concurrency: int = Field(4, ge=1, description="Steps one replica runs at once.")
    use_memory: bool = Field(
        True, description="Recall memories at step start and save the result at the end."
    )


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    service = Service.create("executor", settings, tracer_provider=tracer_provider)
    deps = ExecutorDeps(
        broker=service.broker,
        bus=settings.bus,
        llm_settings=settings.llm,
        max_iterations=settings.max_iterations,
        concurrency=settings.concurrency,
        use_memory=settings.use_memory,
        tracer_provider=service.tracer_provider,
    )
    register(deps)

    async def open_adapters() -> None:
        deps.llm = ObservedProvider(
            build_provider(settings.llm, "executor"),
            role="executor",
            tracer_provider=service.tracer_provider,
            metrics=LLMMetrics(service.metrics),
        )

    async def close_adapters() -> None:
        if deps.llm is not None:
            await deps.llm.aclose()

    return service.app(on_startup=[open_adapters], after_shutdown=[close_adapters])


def main() -> None:
    run("executor", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
