"""A full disk is the machine's problem, not the rows': the worker steps back and tries again.

When the engine's disk tier (weights, KV cache or activations on disk) runs out of space, the
block's rows are not error rows and the shard is not a failure. The worker records a `disk_full`
event naming the directory and the space left, saves the rows' KV-free progress, releases the
shard (a worker on another machine may take it) and waits with a growing backoff before it claims
again; once space is freed it resumes exactly where it stopped. Nothing half-written is ever
registered: a part goes into the store only in the transaction that commits its block.
"""
from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
BACKOFF_S = (5.0, 10.0, 20.0, 40.0, 60.0, 120.0)  # then 120 s between tries


class DiskFull(Exception):
    """The disk under `directory` is full (or over quota)."""

    def __init__(self, directory: Path, free_bytes: int | None, detail: str) -> None:
        self.directory, self.free_bytes, self.detail = directory, free_bytes, detail
        free = "unknown" if free_bytes is None else f"{free_bytes / 2**20:.1f} MiB"
        super().__init__(f"disk full under {directory} ({free} free): {detail}")


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def disk_full_cause(exc: BaseException, directory: Path) -> DiskFull | None:
    """A DiskFull if `exc` (or an exception it was raised from) says the disk is full, else None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFull):
            return current
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return DiskFull(directory, _free_bytes(directory), f"{type(current).__name__}: {current.strerror}")
        if "No space left on device" in str(current):  # torch wraps OS errors in RuntimeError
            return DiskFull(directory, _free_bytes(directory), f"{type(current).__name__}: No space left on device")
        current = current.__cause__ or current.__context__
    return None


@dataclass
class DiskFullBackoff:
    """Seconds to wait before the next claim: growing while the disk stays full, reset by progress."""
    failures: int = 0

    def peek(self) -> float:
        return BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]

    def next_wait(self) -> float:
        wait = self.peek()
        self.failures += 1
        return wait

    def reset(self) -> None:
        self.failures = 0
