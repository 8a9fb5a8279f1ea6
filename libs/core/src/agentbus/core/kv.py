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
        # The stored bytes and revision this process last wrote or read, per key: when
        # nobody else wrote since, a change needs one round trip (the compare-and-set),
        # not two. Bytes, not records: parsing them (pydantic-core) is the cheapest
        # private copy to change, far cheaper than a deep copy of a large record.
        self._last: OrderedDict[str, tuple[bytes, int]] = OrderedDict()
        self._cache_size = cache_size

    async def load(self, key: str) -> tuple[M, int] | None:
        """The record and its revision, remembered: a :meth:`mutate` that follows
        compare-and-sets against it straight away."""
        found = await self._get(key)
        if found is None:
            return None
        return self.model.model_validate_json(found[0]), found[1]

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        self._remember(key, entry.value, entry.revision)
        return entry.value, entry.revision

    async def mutate(
        self, key: str, change: Callable[[M | None], M | None], *, attempts: int = 50
    ) -> M | None:
        """Apply ``change`` to a private copy of the current record and save it with
        compare-and-set, retrying on conflict. ``change`` returns None to leave the record
        as it is; the result is then the current record."""
        remembered = self._last.pop(key, None)
        if remembered is not None:  # optimistic: our last write may still be the latest
            after = change(self.model.model_validate_json(remembered[0]))
            if after is not None:
                payload = after.model_dump_json().encode()
                try:
                    revision = await self.kv.update(key, payload, last=remembered[1])
                except KeyWrongLastSequenceError:
                    pass  # someone else wrote: read and try again below
                else:
                    self._remember(key, payload, revision)
                    return after
        for _ in range(attempts):
            current = await self._get(key)
            before = self.model.model_validate_json(current[0]) if current else None
            after = change(before)
            if after is None:
                return self.model.model_validate_json(current[0]) if current else None
            payload = after.model_dump_json().encode()
            try:
                if current is None:
                    revision = await self.kv.create(key, payload)
                else:
                    revision = await self.kv.update(key, payload, last=current[1])
            except KeyWrongLastSequenceError:
                continue
            self._remember(key, payload, revision)
            return after
        raise StateConflictError(f"{key}: the record kept changing under {attempts} attempts")

    def _remember(self, key: str, payload: bytes, revision: int) -> None:
        self._last[key] = (payload, revision)
        self._last.move_to_end(key)
        while len(self._last) > self._cache_size:
            self._last.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._last.pop(key, None)
        try:
            await self.kv.delete(key)
        except KeyNotFoundError:
            return
