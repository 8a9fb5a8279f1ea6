"""Adapters: the one place that touches asyncpg."""
