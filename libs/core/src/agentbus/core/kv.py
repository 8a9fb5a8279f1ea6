"""Records in a JetStream key-value bucket, changed with compare-and-set, so every
replica of every service can change the same record and no change is lost."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class StateConflictError(RuntimeError):
    """Too many concurrent writers on one record; the caller may try again later."""


async def open_bucket(js: JetStreamContext, bucket: str, *, ttl_s: float | None = None) -> KeyValue:
    """The bucket, created (file storage, no history) if it does not exist yet."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=bucket, history=1, storage=StorageType.FILE, ttl=ttl_s)
        )


class CasStore(Generic[M]):
    """Pydantic records by key; :meth:`mutate` is a compare-and-set loop."""

    def __init__(self, kv: KeyValue, model: type[M], *, cache_size: int = 1024) -> None:
        self.kv = kv
        self.model = model
        # The record and revision this process last wrote, per key: when nobody else
        # wrote since, a change needs one round trip (the compare-and-set) instead of two.
        self._last: OrderedDict[str, tuple[M, int]] = OrderedDict()
        self._cache_size = cache_size

    async def load(self, key: str) -> tuple[M, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        return self.model.model_validate_json(entry.value), entry.revision

    async def mutate(
        self, key: str, change: Callable[[M | None], M | None], *, attempts: int = 50
    ) -> M | None:
        """Apply ``change`` to a copy of the current record and save it with
        compare-and-set, retrying on conflict. ``change`` returns None to leave the record
        as it is; the result is then the current record."""
        remembered = self._last.pop(key, None)
        if remembered is not None:  # optimistic: our last write may still be the latest
            after = change(remembered[0].model_copy(deep=True))
            if after is not None:
                try:
                    revision = await self.kv.update(
                        key, after.model_dump_json().encode(), last=remembered[1]
                    )
                except KeyWrongLastSequenceError:
                    pass  # someone else wrote: read and try again below
                else:
                    self._remember(key, after, revision)
                    return after
        for _ in range(attempts):
            current = await self.load(key)
            before = current[0].model_copy(deep=True) if current else None
            after = change(before)
            if after is None:
                return current[0] if current else None
            payload = after.model_dump_json().encode()
            try:
                if current is None:
                    revision = await self.kv.create(key, payload)
                else:
                    revision = await self.kv.update(key, payload, last=current[1])
            except KeyWrongLastSequenceError:
                continue
            self._remember(key, after, revision)
            return after
        raise StateConflictError(f"{key}: the record kept changing under {attempts} attempts")

    def _remember(self, key: str, record: M, revision: int) -> None:
        self._last[key] = (record.model_copy(deep=True), revision)
        while len(self._last) > self._cache_size:
            self._last.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._last.pop(key, None)
        try:
            await self.kv.delete(key)
        except KeyNotFoundError:
            return
