"""Planner service entry point: ``python -m agentbus.planner`` or ``agentbus-planner``."""

from __future__ import annotations

from faststream import FastStream
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.llm import build_provider
from agentbus.core.llm.observe import LLMMetrics, ObservedProvider
from agentbus.core.service import Service, run
from agentbus.core.settings import CommonSettings, LLMSettings

from .adapters.state import TaskStore
from .handlers import PlannerDeps, register


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_PLANNER_", extra="ignore")

    llm: LLMSettings = Field(default_factory=LLMSettings)


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    service = Service.create("planner", settings, tracer_provider=tracer_provider)
    deps = PlannerDeps(broker=service.broker, bus=settings.bus, llm_settings=settings.llm)
    register(deps)

    async def open_adapters() -> None:
        deps.llm = ObservedProvider(
            build_provider(settings.llm, "planner"),
            role="planner",
            tracer_provider=service.tracer_provider,
            metrics=LLMMetrics(service.metrics),
        )
        deps.store = await TaskStore.open(service.broker.config.connection_state.stream)

    async def close_adapters() -> None:
        if deps.llm is not None:
            await deps.llm.aclose()

    return service.app(on_startup=[open_adapters], after_shutdown=[close_adapters])


def main() -> None:
    run("planner", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
