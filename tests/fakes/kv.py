"""An in-memory JetStream key-value bucket: the subset of ``nats.js.kv.KeyValue`` the
stores use (``get``, ``create``, ``update``, ``put``, ``delete``), with the same errors,
so the real compare-and-set stores (task state, budget ledger, checkpoints) run on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


@dataclass
class _Entry:
    key: str
    value: bytes
    revision: int


class MemoryKV:
    """One bucket. ``conflicts`` makes the next n compare-and-set writes fail, as if
    another replica had written first."""

    def __init__(self) -> None:
        self._data: dict[str, _Entry] = {}
        self._revision = 0
        self.conflicts = 0

    def as_kv(self) -> KeyValue:
        """Typed as the real bucket, for the stores' constructors."""
        return cast(KeyValue, self)

    def _next(self, key: str, value: bytes) -> int:
        self._revision += 1
        self._data[key] = _Entry(key, value, self._revision)
        return self._revision

    async def get(self, key: str, revision: int | None = None) -> Any:
        entry = self._data.get(key)
        if entry is None:
            raise KeyNotFoundError
        return entry

    async def create(self, key: str, value: bytes) -> int:
        if key in self._data or self._conflict():
            raise KeyWrongLastSequenceError
        return self._next(key, value)

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        entry = self._data.get(key)
        if entry is None or entry.revision != last or self._conflict():
            raise KeyWrongLastSequenceError
        return self._next(key, value)

    async def put(self, key: str, value: bytes) -> int:
        return self._next(key, value)

    async def delete(self, key: str, last: int | None = None) -> bool:
        if self._data.pop(key, None) is None:
            raise KeyNotFoundError
        return True

    def keys(self) -> list[str]:
        return sorted(self._data)

    def _conflict(self) -> bool:
        if self.conflicts > 0:
            self.conflicts -= 1
            return True
        return False
