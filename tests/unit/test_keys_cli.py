"""``agentbus keys``: the key made on the operator's machine, and the argument wiring."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from agentbus.cli import keys_cmd
from agentbus.cli.keys import hash_key, new_key
from agentbus.contracts import KeyCreateRequest


def test_a_new_key_is_random_and_only_its_hash_and_prefix_are_for_memory() -> None:
    key, key_hash, prefix = new_key()
    assert key.startswith("agb_") and len(key) == 4 + 43  # 32 random bytes, URL-safe
    assert key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    assert key.startswith(prefix) and len(prefix) == 12
    KeyCreateRequest(tenant="acme", key_hash=key_hash, prefix=prefix)  # what memory accepts
    assert len({new_key().key for _ in range(100)}) == 100


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentbus")
    keys_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_the_keys_commands_and_their_arguments() -> None:
    create = parser().parse_args(["keys", "create", "--tenant", "acme"])
    assert (create.handler, create.tenant) == (keys_cmd.create_command, "acme")
    listing = parser().parse_args(["keys", "list"])
    assert (listing.handler, listing.tenant, listing.json) == (keys_cmd.list_command, None, False)
    revoke = parser().parse_args(["keys", "revoke", "key_1"])
    assert (revoke.handler, revoke.key_id) == (keys_cmd.revoke_command, "key_1")
    with pytest.raises(SystemExit):
        parser().parse_args(["keys", "create"])  # a key always belongs to a tenant


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "create", "--tenant", "not a name!"],
        ["keys", "list", "--tenant", "x" * 65],
        ["keys", "revoke", "k" * 65],
    ],
)
async def test_a_bad_argument_exits_2_without_asking_memory(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def no_memory(*_: object) -> int:
        raise AssertionError("memory must not be asked")

    monkeypatch.setattr(keys_cmd, "ask_memory", no_memory)
    args = parser().parse_args(argv)
    assert await args.handler(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("agentbus: 1 problem(s): ")
