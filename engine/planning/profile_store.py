"""Where hardware profiles are stored, and how a stored profile learns the disk bandwidth the engine
really gets.

Profiles live as JSON under `$FLEXJOB_HOME/profiles` (default: the user data directory, see engine.runtime.paths), one per host, device and
disk directory (`profile_path`).

A profile's disk figures come from a probe of a few seconds. On a shared host the disk drifts 2-4x
within the hour, and what the engine's I/O thread gets beside busy compute threads is not what an
idle probe gets (probe 1.2-2.6 GB/s against the engine's reads at 0.45-1.3 GB/s on the same files,
on one cloud VM). Every finished block reports bytes and busy seconds per link
(`EngineStats.blocks`); the caller of the engine (the worker, `flexjob generate`) hands them to
`learn_from_blocks`, which blends each block's disk read and write bandwidth into the profile
stored for the engine's disk directory, a moving average weighted by traffic, so the next plan
starts from what runs measured rather than from the probe. The probe's own figures are kept
(`HardwareProfile.probed_gbps`), and only a profile that exists is updated: runs never create one.
"""
from __future__ import annotations

import fcntl
import hashlib
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from engine.planning.hardware import LINK_FIELDS, HardwareProfile
from engine.runtime.paths import engine_home
from engine.runtime.stats import BlockRecord, EngineStats
from engine.runtime.tiers import DISK_READ, DISK_WRITE

LEARNED_LINKS = (DISK_READ, DISK_WRITE)
# A block's figure counts when it moved at least this much (a few rows or small cache appends time
# latency, not bandwidth), with a weight that reaches one half at HALF_WEIGHT_BYTES.
MIN_BYTES = 64 * 2**20
HALF_WEIGHT_BYTES = 4e9


def profile_path(disk_dir: str | Path, home: Path | None = None) -> Path:
    """The stored profile of this host, its compute device and `disk_dir`, under `home`
    (default: engine.runtime.paths.engine_home())."""
    disk_dir = str(Path(disk_dir).resolve())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    key = hashlib.sha1(f"{socket.gethostname()}|{device}|{disk_dir}".encode()).hexdigest()[:12]
    return (home or engine_home()) / "profiles" / f"{socket.gethostname()}-{key}.json"


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
        try:
            prof.save(path)
        except OSError:
            return None  # learning is best effort: a full disk must not stop generation
        return prof


def learn_from_blocks(disk_dir: str | Path, blocks: Iterable[BlockRecord], *,
                      home: Path | None = None) -> HardwareProfile | None:
    """Blend every block into the stored profile, skipping blocks run with a throttled link (the test
    knob's figures are not this host's). Returns the last updated profile, if any."""
    learned = None
    for block in blocks:
        if not block.throttled:
            learned = record_block(disk_dir, block.transfers, home=home) or learned
    return learned


class DiskBandwidthLearner:
    """Learns from each finished block of a long-running caller's engines exactly once."""

    def __init__(self, disk_dir: str | Path, *, home: Path | None = None) -> None:
        self.disk_dir, self.home = disk_dir, home
        self._stats: EngineStats | None = None
        self._seen = 0

    def observe(self, stats: EngineStats) -> None:
        """Learn from the blocks `stats` gained since the last call (a new engine: all of them)."""
        if stats is not self._stats:
            self._stats, self._seen = stats, 0
        learn_from_blocks(self.disk_dir, stats.blocks[self._seen:], home=self.home)
        self._seen = len(stats.blocks)
