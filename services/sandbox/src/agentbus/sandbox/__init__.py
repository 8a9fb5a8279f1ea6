"""agentbus sandbox: runs agent code and file operations in locked-down containers,
one per task, with no network and capped memory, CPU, processes, time and output."""

from .main import Settings, create_app

__all__ = ["Settings", "create_app"]
