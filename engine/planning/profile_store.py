"""The stored hardware profile learns the disk bandwidth the engine really gets.

A profile's disk figures come from a probe of a few seconds. On a shared host the disk drifts 2-4x
within the hour, and what the engine's I/O thread gets beside busy compute threads is not what an
idle probe gets (sessions 4-5: probe 1.2-2.6 GB/s, the engine's reads 0.45-1.3 GB/s on the same
files). Every finished block reports bytes and busy seconds per link; `record_block` blends the
block's disk read and write bandwidth into the profile stored for the engine's disk directory, a
moving average weighted by traffic, so the next plan (the worker's, `generate`'s, `flexjob plan`'s)
starts from what runs measured rather than from the probe. The probe's own figures are kept
(`HardwareProfile.probed_gbps`), and only a profile that exists is updated: runs never create one.
"""
from __future__ import annotations

import fcntl
from collections.abc import Mapping
from pathlib import Path

from engine.planning.hardware import DISK_READ, DISK_WRITE, LINK_FIELDS, HardwareProfile

LEARNED_LINKS = (DISK_READ, DISK_WRITE)
# A block's figure counts when it moved at least this much (a few rows or small cache appends time
# latency, not bandwidth), with a weight that reaches one half at HALF_WEIGHT_BYTES.
MIN_BYTES = 64 * 2**20
HALF_WEIGHT_BYTES = 4e9


def blended_gbps(current: float, nbytes: float, seconds: float) -> float | None:
    """The link's new figure after a block that moved `nbytes` in `seconds` (None: not enough)."""
    if nbytes < MIN_BYTES or seconds <= 0:
        return None
    weight = 1.0 - 0.5 ** (nbytes / HALF_WEIGHT_BYTES)
    return (1.0 - weight) * current + weight * nbytes / seconds / 1e9


def record_block(disk_dir: str | Path, transfers: Mapping[str, tuple[float, float]], *,
                 home: Path | None = None) -> HardwareProfile | None:
    """Blend one block's disk figures into the stored profile of this host and disk directory.
    Returns the updated profile, or None when there is none, it cannot be read, or the block moved
    too little to learn from."""
    from engine.planning.profiler import profile_path

    if not any(transfers.get(link, (0, 0.0))[0] >= MIN_BYTES for link in LEARNED_LINKS):
        return None  # nothing to learn (weights, cache and activations in memory): no file I/O
    path = profile_path(disk_dir, home)
    if not path.is_file():
        return None
    with open(path.with_suffix(".lock"), "a") as lock:  # workers sharing a disk directory
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            prof = HardwareProfile.load(path)
        except (ValueError, OSError):
            return None
        changes, probed = {}, dict(prof.probed_gbps)
        for link in LEARNED_LINKS:
            field = LINK_FIELDS[link]
            nbytes, seconds = transfers.get(link, (0, 0.0))
            new = blended_gbps(getattr(prof, field), nbytes, seconds)
            if new is not None:
                probed.setdefault(field, getattr(prof, field))
                changes[field] = new
        if not changes:
            return prof
        prof = prof.replace(**changes, probed_gbps=probed, learned_blocks=prof.learned_blocks + 1)
        prof.save(path)
        return prof
