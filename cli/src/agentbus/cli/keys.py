"""API keys of the HTTP gateway, made on the operator's machine.

A key is ``agb_`` and 43 URL-safe random characters (256 bits). Only its SHA-256 (hex)
and its first characters ever leave this process: memory stores those, and the gateway
looks a caller's key up by the same hash (``hash_key``).
"""

from __future__ import annotations

import secrets
from typing import Final, NamedTuple

from agentbus.contracts import hash_api_key

KEY_START: Final = "agb_"
PREFIX_CHARS: Final = 12  # what memory keeps to recognise a key: "agb_" and 8 characters


class NewKey(NamedTuple):
    key: str
    key_hash: str
    prefix: str


hash_key = hash_api_key  # the SHA-256 of a key, hex: what memory stores and looks it up by


def new_key() -> NewKey:
    """A fresh key with its hash and its prefix (``key, key_hash, prefix = new_key()``)."""
    key = KEY_START + secrets.token_urlsafe(32)
    return NewKey(key, hash_key(key), key[:PREFIX_CHARS])
