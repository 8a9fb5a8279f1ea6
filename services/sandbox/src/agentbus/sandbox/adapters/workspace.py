"""Host-side bookkeeping of workspaces: disk usage and last-use markers.

The service never reads, writes or follows anything agent code made in a workspace.
:func:`disk_usage` only sums ``lstat`` sizes, walking with :func:`os.fwalk` without
following symlinks: directories are opened relative to their parent's descriptor and
checked to be the directory that was listed, so a symlink swapped in mid-walk is not
followed out of the workspace.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_BLOCK = 512  # st_blocks unit


def disk_usage(top: Path) -> int:
    """Bytes of disk the tree under ``top`` takes (0 if it does not exist).

    Counts allocated blocks, so sparse files count what they really take; hard links
    count once per name (over-counting is the safe side of a cap).
    """
    try:
        total = top.lstat().st_blocks * _BLOCK
    except FileNotFoundError:
        return 0
    with contextlib.suppress(FileNotFoundError):
        for _, dirs, files, dir_fd in os.fwalk(top, follow_symlinks=False):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):  # removed meanwhile
                    total += os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_blocks * _BLOCK
    return total


def touch(marker: Path) -> None:
    """Record "used now" for a task (a marker outside its workspace)."""
    try:
        os.utime(marker)
    except FileNotFoundError:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def last_used(marker: Path) -> float | None:
    try:
        return marker.stat().st_mtime
    except FileNotFoundError:
        return None
