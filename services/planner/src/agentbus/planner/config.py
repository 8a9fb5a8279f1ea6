"""Budget defaults of the platform: what a task gets for every limit it leaves unset."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentbus.contracts import Budget, OnBudget


class BudgetDefaults(BaseSettings):
    """Env prefix ``AGENTBUS_BUDGET_``. Unset limits are no limits."""

    model_config = SettingsConfigDict(env_prefix="AGENTBUS_BUDGET_", extra="ignore")

    max_cost_usd: float | None = Field(None, gt=0, description="Default cost budget (USD).")
    max_tokens: int | None = Field(None, ge=1, description="Default token budget.")
    max_llm_calls: int | None = Field(None, ge=1, description="Default budget of LLM calls.")
    max_sandbox_cpu_seconds: float | None = Field(
        None, gt=0, description="Default budget of sandbox CPU-seconds."
    )
    on_exhausted: OnBudget = Field(
        OnBudget.PAUSE, description="pause (wait for approval) or fail when a budget runs out."
    )
    approval_timeout_s: float = Field(
        3600, gt=0, description="How long a paused task waits for approval before failing."
    )

    def apply(self, budget: Budget) -> Budget:
        """The task's effective budget: its own limits, the defaults for the rest."""
        fields = (
            "max_cost_usd",
            "max_tokens",
            "max_llm_calls",
            "max_sandbox_cpu_seconds",
            "on_exhausted",
            "approval_timeout_s",
        )
        filled = {f: getattr(self, f) for f in fields if getattr(budget, f) is None}
        return budget.model_copy(update=filled)
