"""agentbus gateway: the HTTP API (``/v1``) and live event streams for apps and people."""

from .main import Settings, create_app

__all__ = ["Settings", "create_app"]
