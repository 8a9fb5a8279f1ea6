"""Naming a database for messages and logs, without its secrets."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without user or password, for messages and logs."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or parse_qs(parts.query).get("host", ["local socket"])[0]
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an unparsable database URL"
    return f"{host}{port}{parts.path}"
