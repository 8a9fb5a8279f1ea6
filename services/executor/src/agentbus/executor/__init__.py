"""agentbus executor: runs one plan step as an LLM tool-use loop."""

from .main import Settings, create_app

__all__ = ["Settings", "create_app"]
