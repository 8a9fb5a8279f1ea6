"""Executor service entry point: ``python -m agentbus.executor`` or ``agentbus-executor``."""

from __future__ import annotations

import contextlib

from faststream import FastStream
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from agentbus.core.budget import BudgetLedger
from agentbus.core.bus import BusPublisher, instance_id, jetstream
from agentbus.core.service import Service, for_docs, run
from agentbus.core.settings import CommonSettings, LLMSettings

from . import routes
from .adapters.checkpoints import CheckpointStore
from .adapters.tools import BusStepTools
from .usecases import Executor


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
    service.serve(routes.build_router(settings.bus, concurrency=settings.concurrency))
    opened = contextlib.AsyncExitStack()

    async def open_adapters() -> None:
        js = jetstream(service.broker)
        ledger = await BudgetLedger.open(js)
        checkpoints = await CheckpointStore.open(js)
        llm = await service.llm_provider(settings.llm, "executor", ledger)
        opened.push_async_callback(llm.aclose)
        publisher = BusPublisher(service.broker)
        tracer = trace.get_tracer("agentbus.executor", tracer_provider=service.tracer_provider)
        executor = Executor(
            llm=llm,
            ledger=ledger,
            checkpoints=checkpoints,
            publisher=publisher,
            tools=BusStepTools(
                service.broker,
                settings.bus.rpc_timeout_s,
                tracer=tracer,
                ledger=ledger,
                publisher=publisher,
                cpus=settings.sandbox_cpus,
            ),
            tracer=tracer,
            worker=instance_id(),
            model=settings.llm.model_for("executor"),
            max_iterations=settings.max_iterations,
            max_tokens=settings.llm.max_tokens,
            use_memory=settings.use_memory,
        )
        service.provide(routes.USES, executor)

    return service.app(on_startup=[open_adapters], after_shutdown=[opened.aclose])


def main() -> None:
    run("executor", Settings(), create_app)


def asyncapi_app() -> FastStream:
    """Zero-argument factory for `faststream docs gen --factory` (`make asyncapi`)."""
    return for_docs(create_app(Settings()))
