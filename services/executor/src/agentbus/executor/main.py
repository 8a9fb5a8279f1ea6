"""Executor service entry point: ``python -m agentbus.executor`` or ``agentbus-executor``."""

from __future__ import annotations

from faststream import FastStream
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.llm import build_provider
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


def create_app(settings: Settings) -> FastStream:
    service = Service.create("executor", settings)
    deps = ExecutorDeps(
        broker=service.broker,
        bus=settings.bus,
        llm_settings=settings.llm,
        max_iterations=settings.max_iterations,
        concurrency=settings.concurrency,
        use_memory=settings.use_memory,
    )
    register(deps)

    async def open_adapters() -> None:
        deps.llm = build_provider(settings.llm, "executor")

    async def close_adapters() -> None:
        if deps.llm is not None:
            await deps.llm.aclose()

    return service.app(on_startup=[open_adapters], after_shutdown=[close_adapters])


def main() -> None:
    run("executor", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
