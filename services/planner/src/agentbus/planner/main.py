"""Planner service entry point: ``python -m agentbus.planner`` or ``agentbus-planner``."""

from __future__ import annotations

import contextlib

from faststream import FastStream
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.budget import BudgetLedger
from agentbus.core.bus import BusPublisher, jetstream
from agentbus.core.service import Service, for_docs, run
from agentbus.core.settings import CommonSettings, LLMSettings

from .adapters.state import TaskStore
from .adapters.timers import TimerStore
from .config import BudgetDefaults
from .routes import USES, build_router
from .usecases import Planner, Sweeper


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBUS_PLANNER_", extra="ignore")

    llm: LLMSettings = Field(default_factory=LLMSettings)
    budget: BudgetDefaults = Field(default_factory=BudgetDefaults)
    sweep_interval_s: float = Field(
        1.0, gt=0, description="How often deadlines (time budget, approval wait) are checked."
    )


def create_app(settings: Settings, tracer_provider: TracerProvider | None = None) -> FastStream:
    service = Service.create("planner", settings, tracer_provider=tracer_provider)
    service.serve(build_router(settings.bus))
    opened = contextlib.AsyncExitStack()  # closed in reverse order after shutdown

    async def open_adapters() -> None:
        js = jetstream(service.broker)
        ledger = await BudgetLedger.open(js)
        llm = await service.llm_provider(settings.llm, "planner", ledger)
        opened.push_async_callback(llm.aclose)
        timers = await TimerStore.open(js)
        opened.push_async_callback(timers.close)
        planner = Planner(
            states=await TaskStore.open(js),
            timers=timers,
            ledger=ledger,
            llm=llm,
            publisher=BusPublisher(service.broker),
            model=settings.llm.model_for("planner"),
            max_tokens=settings.llm.max_tokens,
            defaults=settings.budget,
        )
        service.provide(USES, planner)
        sweeper = Sweeper(planner.sweep, settings.sweep_interval_s)
        sweeper.start()
        opened.push_async_callback(sweeper.stop)

    return service.app(on_startup=[open_adapters], after_shutdown=[opened.aclose])


def main() -> None:
    run("planner", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return for_docs(create_app(Settings()))
