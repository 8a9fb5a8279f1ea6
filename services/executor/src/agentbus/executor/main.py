"""Executor service entry point: ``python -m agentbus.executor`` or ``agentbus-executor``."""

from __future__ import annotations

from faststream import FastStream
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.budget import BudgetLedger
from agentbus.core.bus import jetstream
from agentbus.core.service import Service, run
from agentbus.core.settings import CommonSettings, LLMSettings

from .adapters.checkpoints import CheckpointStore
from .handlers import ExecutorDeps, register


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_EXECUTOR_", extra="ignore")

    llm: LLMSettings = Field(default_factory=LLMSettings)
    max_iterations: int = Field(20, ge=1, description="Most LLM turns per step.")
    concurrency: int = Field(4, ge=1, description="Steps one replica runs at once.")
    use_memory: bool = Field(
        True, description="Recall memories at step start and save the result at the end."
    )
    sandbox_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs of a sandbox container (as AGENTBUS_SANDBOX_CPUS); a run reserves "
        "its time limit times this many CPU-seconds from the task's budget.",
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
        sandbox_cpus=settings.sandbox_cpus,
        tracer_provider=service.tracer_provider,
    )
    register(deps)

    async def open_adapters() -> None:
        js = jetstream(service.broker)
        deps.ledger = await BudgetLedger.open(js)
        deps.checkpoints = await CheckpointStore.open(js)
        deps.llm = await service.llm_provider(settings.llm, "executor", deps.ledger)

    async def close_adapters() -> None:
        if deps.llm is not None:
            await deps.llm.aclose()

    return service.app(on_startup=[open_adapters], after_shutdown=[close_adapters])


def main() -> None:
    run("executor", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
