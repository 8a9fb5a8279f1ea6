"""agentbus memory: the durable event log of every task and its task projections,
on Postgres + pgvector (the only service with a database)."""

from .main import Settings, create_app

__all__ = ["Settings", "create_app"]
