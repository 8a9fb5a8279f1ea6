"""agentbus planner: turns a goal into a plan of steps and drives it to an answer."""

from .main import Settings, create_app

__all__ = ["Settings", "create_app"]
