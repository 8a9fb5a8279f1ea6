"""Workarounds for nats-py bugs, applied explicitly (``create_broker`` calls
``apply_nats_fixes``), never as a side effect of an import. Each has a canary test in
tests/integration/test_pull_fetch.py that fails once upstream fixes the bug, so the
workaround can then be removed.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import nats.errors
from nats.js.client import JetStreamContext

_PullSubscription: Final = JetStreamContext.PullSubscription
# nats-py's own fetch, before the fix below wraps it (the canary test calls it).
ORIGINAL_FETCH: Final = _PullSubscription.fetch


def apply_nats_fixes() -> None:
    """Apply every workaround below; idempotent."""
    if getattr(_PullSubscription.fetch, "_agentbus_wrapped", False):
        return
    _PullSubscription.fetch = _fetch_times_out_as_nats_does(ORIGINAL_FETCH)  # type: ignore[method-assign]


def _fetch_times_out_as_nats_does(original: Any) -> Any:
    """nats-py 2.16's batch ``fetch`` can end with a bare ``asyncio.TimeoutError`` (when
    its deadline has passed before the lingering pull request) instead of
    ``nats.errors.TimeoutError``. FastStream 0.7.8's batch pull loop catches only the
    latter; the former kills the loop, and the messages the loop had already fetched
    stay unacked until ``ack_wait`` (60 s) redelivers them. Memory's batch consumer hit
    it often. Raise what callers expect (a ``nats.errors.TimeoutError`` is an
    ``asyncio.TimeoutError`` too, so no caller loses anything)."""

    @functools.wraps(original)
    async def fetch(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, *args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    fetch._agentbus_wrapped = True  # type: ignore[attr-defined]
    return fetch
