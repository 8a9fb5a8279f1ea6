"""``agentbus keys create|list|revoke``: the HTTP gateway's API keys, per tenant, kept by
the memory service (asked over request/reply, as ``agentbus tasks list`` does).

A key is made here (``keys.new_key``) and printed once; memory gets only its SHA-256 and
prefix. Exit codes: 0 done, 1 memory refused (or no such key to revoke), 2 a bad
argument, 3 no stack or no answer.

Wiring (in ``main.build_parser``): ``keys_cmd.add_parser(sub)``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from agentbus.contracts import (
    KeyCreateReply,
    KeyCreateRequest,
    KeyListReply,
    KeyListRequest,
    KeyRevokeReply,
    KeyRevokeRequest,
    Reply,
    describe_validation,
    subjects,
)

from .keys import new_key
from .tasks_cmd import ask_memory

EXIT_BAD_ARGUMENT = 2


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys create``, ``keys list`` and ``keys revoke`` on ``subparsers``."""
    keys = subparsers.add_parser("keys", help="API keys of the HTTP gateway, per tenant")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)

    create = keys_sub.add_parser("create", help="make a key for a tenant (shown only once)")
    create.add_argument(
        "--tenant", required=True, help="the tenant the key acts for (letters, digits, _ and -)"
    )
    create.set_defaults(handler=create_command)

    listing = keys_sub.add_parser("list", help="the keys (revoked ones too), oldest first")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="print the reply as JSON")
    listing.set_defaults(handler=list_command)

    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the key's id, as 'keys list' shows it")
    revoke.set_defaults(handler=revoke_command)


R = TypeVar("R", bound=Reply)


async def _ask(subject: str, request: Callable[[], BaseModel], reply_type: type[R]) -> R | int:
    """Build the request from the arguments (a bad one exits 2, memory is not asked),
    then ask memory (``ask_memory``: its reply, or the exit code)."""
    try:
        built = request()
    except ValidationError as exc:
        return _bad(exc)
    return await ask_memory(subject, built, reply_type)


def _bad(exc: ValidationError) -> int:
    print(f"agentbus: {describe_validation(exc)}", file=sys.stderr)
    return EXIT_BAD_ARGUMENT


def _when(at: datetime | None) -> str:
    return f"{at:%Y-%m-%d %H:%M:%S}" if at is not None else "-"


async def create_command(args: argparse.Namespace) -> int:
    key, key_hash, prefix = new_key()
    reply = await _ask(
        subjects.MEMORY_KEYS_CREATE,
        lambda: KeyCreateRequest(tenant=args.tenant, key_hash=key_hash, prefix=prefix),
        KeyCreateReply,
    )
    if isinstance(reply, int):
        return reply
    if reply.key is None:
        print("agentbus: memory answered without the key it stored", file=sys.stderr)
        return 1
    print(f"key:    {key}")
    print("This key is shown only now: keep it safe; memory stores only its hash.")
    print(f"key id: {reply.key.key_id}")
    print(f"tenant: {reply.key.tenant}")
    return 0


async def list_command(args: argparse.Namespace) -> int:
    reply = await _ask(
        subjects.MEMORY_KEYS_LIST, lambda: KeyListRequest(tenant=args.tenant), KeyListReply
    )
    if isinstance(reply, int):
        return reply
    if args.json:
        print(reply.model_dump_json(indent=1))
        return 0
    if not reply.keys:
        print("no keys")
        return 0
    print(
        f"{'key id':<25} {'tenant':<20} {'prefix':<13} {'created (UTC)':<19} {'revoked (UTC)':<19}"
    )
    for k in reply.keys:
        print(
            f"{k.key_id:<25} {k.tenant:<20} {k.prefix:<13} {_when(k.created_at):<19} "
            f"{_when(k.revoked_at):<19}"
        )
    return 0


async def revoke_command(args: argparse.Namespace) -> int:
    reply = await _ask(
        subjects.MEMORY_KEYS_REVOKE, lambda: KeyRevokeRequest(key_id=args.key_id), KeyRevokeReply
    )
    if isinstance(reply, int):
        return reply
    if not reply.revoked:
        print(
            f"agentbus: no key {args.key_id} to revoke (unknown, or revoked already)",
            file=sys.stderr,
        )
        return 1
    print(f"revoked {args.key_id}: memory refuses it from now on")
    return 0
