"""Size caps of the sandbox: uploads, workspace room, and the host-side usage walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentbus.sandbox.adapters.workspace import disk_usage
from agentbus.sandbox.domain import InvalidRequest, SandboxConfig, check_room, check_upload

CONFIG = SandboxConfig(
    image="x", workspace_root=Path("/nonexistent"), workspace_max_mb=1, max_upload_bytes=1000
)


def test_uploads_over_the_cap_are_refused_with_the_limit() -> None:
    check_upload(1000, CONFIG, "stdin")
    with pytest.raises(InvalidRequest, match=r"stdin is 1001 bytes; .* at most 1000"):
        check_upload(1001, CONFIG, "stdin")


def test_writes_that_would_overfill_the_workspace_are_refused() -> None:
    check_room(1024 * 1024 - 10, 10, CONFIG)
    with pytest.raises(InvalidRequest, match="workspace is full"):
        check_room(1024 * 1024 - 10, 11, CONFIG)


def test_disk_usage_counts_blocks_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    assert disk_usage(tmp_path / "missing") == 0
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 200_000)
    empty = disk_usage(tmp_path / "d")
    big = tmp_path / "big"
    big.write_bytes(b"y" * 3_000_000)
    with (tmp_path / "sparse").open("wb") as f:  # 1 GB apparent size, no blocks
        f.truncate(1 << 30)
    (tmp_path / "d" / "link").symlink_to(big)
    (tmp_path / "d" / "dirlink").symlink_to(tmp_path)
    used = disk_usage(tmp_path / "d")
    assert empty <= used <= empty + 8192  # at most a block per link; targets not counted
    total = disk_usage(tmp_path)
    assert 3_200_000 <= total < 3_400_000 + tmp_path.stat().st_blocks * 512
