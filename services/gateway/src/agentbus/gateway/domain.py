"""The gateway's rules, free of I/O: who is calling, what they may see, pages.

A caller is the tenant of its API key. A task belongs to the tenant its
``TaskSubmitted`` names; to any other tenant it does not exist (404, never 403, so
task ids of other tenants cannot even be confirmed)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime

from agentbus.contracts import ProblemField, hash_api_key


class ProblemError(Exception):
    """A request that cannot be served, as an RFC 9457 problem."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str = "", errors: list[ProblemField] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []


class BadRequest(ProblemError):
    status = 400
    title = "Bad request"


class Unauthorized(ProblemError):
    status = 401
    title = "Unauthorized"


class NotFound(ProblemError):
    status = 404
    title = "Not found"


class Unavailable(ProblemError):
    status = 503
    title = "Service unavailable"


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the tenant and the key it used."""

    tenant: str
    key_id: str


hash_key = hash_api_key  # what memory stores and is asked about; the key stays here


def bearer_key(authorization: str | None) -> str:
    """The API key of an ``Authorization: Bearer <key>`` header."""
    if not authorization:
        raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    return key.strip()


def last_event_id(header: str | None) -> int:
    """The stream sequence an SSE client last saw (0: none)."""
    if header is None or not header.strip():
        return 0
    try:
        seq = int(header)
    except ValueError:
        seq = -1
    if seq < 0:
        raise BadRequest(
            "Last-Event-ID must be an id this stream sent (a non-negative integer)",
            [ProblemField(field="header.Last-Event-ID", message=f"not an event id: {header!r}")],
        )
    return seq


def encode_cursor(created_at: datetime) -> str:
    """A page cursor: the submission time of the last task shown (opaque to clients)."""
    return base64.urlsafe_b64encode(created_at.isoformat().encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> datetime:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at = datetime.fromisoformat(text)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        at = None
    if at is None or at.tzinfo is None:
        raise BadRequest(
            "the cursor is not one this API gave",
            [ProblemField(field="query.cursor", message="not a cursor from a previous page")],
        )
    return at


class KeyCache:
    """Verified keys for ``ttl_s`` (a revoked key stops working within that time)."""

    def __init__(self, ttl_s: float, size: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._known: dict[str, tuple[Caller, float]] = {}

    def get(self, key_hash: str, now: float) -> Caller | None:
        found = self._known.get(key_hash)
        if found is None or found[1] <= now:
            self._known.pop(key_hash, None)
            return None
        return found[0]

    def put(self, key_hash: str, caller: Caller, now: float) -> None:
        if len(self._known) >= self.size:
            self._known.pop(next(iter(self._known)))
        self._known[key_hash] = (caller, now + self.ttl_s)
