"""Adapters: the one place that touches asyncpg, httpx and nats-py's messages."""
