"""Prices per model, in US dollars per million tokens, so every call has a cost."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field

from agentbus.contracts import ModelUsage


class Price(BaseModel):
    input: float = Field(ge=0, description="USD per 1M uncached input tokens.")
    output: float = Field(ge=0, description="USD per 1M output tokens.")
    cached_input: float | None = Field(None, ge=0, description="USD per 1M cached input tokens.")


class PriceTable(BaseModel):
    model_config = {"extra": "ignore"}

    prices: dict[str, Price] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """The table in ``path``, or the bundled default table."""
        if path is not None:
            return cls.model_validate_json(path.read_text())
        text = resources.files("agentbus.core.llm").joinpath("prices.json").read_text()
        return cls.model_validate(json.loads(text))

    def lookup(self, model: str) -> Price | None:
        if model in self.prices:
            return self.prices[model]
        # Providers answer with dated names (gpt-4o-mini-2024-07-18): match the longest prefix.
        matches = [name for name in self.prices if model.startswith(name)]
        return self.prices[max(matches, key=len)] if matches else None

    def cost(self, model: str, usage: ModelUsage) -> float:
        price = self.lookup(model)
        if price is None:
            return 0.0
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        cached_price = price.cached_input if price.cached_input is not None else price.input
        return (
            (usage.prompt_tokens - cached) * price.input
            + cached * cached_price
            + usage.completion_tokens * price.output
        ) / 1_000_000
