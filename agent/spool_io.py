"""Durable writes for the spool (kvmeter.agent.spool): a frame's pieces in as few writev calls as
the kernel allows, and a directory's entries fsynced (a new segment's name survives a crash)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

IOV_MAX = 1024  # pieces per writev (Linux's limit)


def write_all(fd: int, pieces: list[Any]) -> None:
    """Write every piece, in order, with as few system calls as the kernel allows."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    while views:
        written = os.writev(fd, views[:IOV_MAX])
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:  # a piece written in part
            views[0] = views[0][written:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
