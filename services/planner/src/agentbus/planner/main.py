"""Planner service entry point: ``python -m agentbus.planner`` or ``agentbus-planner``."""

from __future__ import annotations

from faststream import FastStream
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.budget import BudgetLedger
from agentbus.core.bus import jetstream
from agentbus.core.service import Service, run
from agentbus.core.settings import CommonSettings, LLMSettings

from .adapters.state import TaskStore
from .adapters.timers import TimerStore
from .config import BudgetDefaults
from .handlers import PlannerDeps, Sweeper, register


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_PLANNER_", extra="ignore")

    llm: LLMSettings = Field(default_factory=LLMSettings)
    budget: BudgetDefaults = Field(default_factory=BudgetDefaults)
    sweep_interval_s: float = Field(
        1.0, gt=0, description="How often deadlines (time budget, approval wait) are checked."
    )


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    service = Service.create("planner", settings, tracer_provider=tracer_provider)
    deps = PlannerDeps(
        broker=service.broker,
        bus=settings.bus,
        llm_settings=settings.llm,
        defaults=settings.budget,
    )
    register(deps)
    sweeper = Sweeper(deps, settings.sweep_interval_s)

    async def open_adapters() -> None:
        js = jetstream(service.broker)
        deps.ledger = await BudgetLedger.open(js)
        deps.llm = await service.llm_provider(settings.llm, "planner", deps.ledger)
        deps.store = await TaskStore.open(js)
        deps.timers = await TimerStore.open(js)
        sweeper.start()

    async def close_adapters() -> None:
        await sweeper.stop()
        if deps.timers is not None:
            await deps.timers.close()
        if deps.llm is not None:
            await deps.llm.aclose()

    return service.app(on_startup=[open_adapters], after_shutdown=[close_adapters])


def main() -> None:
    run("planner", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return create_app(Settings())
