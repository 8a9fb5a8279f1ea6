"""The sandbox's Prometheus metrics, in the service's registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram


class SandboxMetrics:
    """``agentbus_sandbox_exec_seconds{language,outcome}`` (the
    :class:`~agentbus.sandbox.ports.ExecMetrics` port) and
    ``agentbus_sandbox_pool_size``, which reads 0 until :meth:`watch_pool`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.exec_seconds = Histogram(
            "agentbus_sandbox_exec_seconds",
            "Code runs in the sandbox, by language and typed outcome.",
            ("language", "outcome"),
            registry=registry,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.pool_size = Gauge(
            "agentbus_sandbox_pool_size",
            "Warm containers waiting in this replica's pool.",
            registry=registry,
        )

    def observe_exec(self, language: str, outcome: str, seconds: float) -> None:
        self.exec_seconds.labels(language, outcome).observe(seconds)

    def watch_pool(self, available: Callable[[], int]) -> None:
        """Report ``available()`` as the pool size from now on (once the sandbox is open)."""
        self.pool_size.set_function(available)
