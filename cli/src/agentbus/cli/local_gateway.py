"""The gateway as ``agentbus up`` runs it: one replica on a free loopback port, and the
local tenant's API key, made on first start and kept in ``$AGENTBUS_HOME/gateway.key``
(readable by its owner only), so a newcomer can call the API (or open the console)
at once."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from agentbus.contracts import (
    KeyCreateReply,
    KeyCreateRequest,
    KeyVerifyReply,
    KeyVerifyRequest,
    subjects,
)
from agentbus.core.bus import rpc

from . import client
from .keys import hash_key, new_key
from .stack import ServiceGroup, StackError, wait_ready

LOCAL_TENANT: Final = "local"


def key_file(home: Path) -> Path:
    return home / "gateway.key"


async def local_key(nats_url: str, home: Path) -> str:
    """The local tenant's key, registered with memory (again, if memory lost it)."""
    path = key_file(home)
    key = path.read_text().strip() if path.exists() else ""
    async with client.connect(nats_url) as broker:
        if key:
            known = await rpc(
                broker,
                subjects.MEMORY_KEYS_VERIFY,
                KeyVerifyRequest(key_hash=hash_key(key)),
                KeyVerifyReply,
                timeout=10,
            )
            if known.ok:
                return key
        key, key_hash, prefix = new_key()
        request = KeyCreateRequest(tenant=LOCAL_TENANT, key_hash=key_hash, prefix=prefix)
        reply = await rpc(broker, subjects.MEMORY_KEYS_CREATE, request, KeyCreateReply, timeout=10)
    if not reply.ok:
        raise StackError(f"could not create the local API key: {reply.error}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


async def start_gateway(env: Mapping[str, str], home: Path, nats_url: str) -> ServiceGroup:
    """One gateway replica next to a running stack, ready (or StackError)."""
    group = ServiceGroup(env, home / "logs").start({"gateway": 1})
    try:
        await wait_ready(nats_url, ["gateway"], group=group)
    except BaseException:
        group.stop()
        raise
    return group
