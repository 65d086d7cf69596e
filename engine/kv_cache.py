"""The KV cache of one block, one slot per (decoder layer, micro-batch), each on its own tier.

Layout of a slot: [max_len, 2, B, h] — position-major, so appending a decode step is one contiguous
write and reading the first T positions is one contiguous read, on every tier (a disk slot is a
file with the same layout).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.tiers import DiskTier, Tier


class CacheSlot:
    def __init__(self, tier: Tier, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, disk: DiskTier, path: Path) -> None:
        self.tier, self.shape, self.dtype = tier, shape, dtype
        self.disk, self.path = disk, path
        self.row_bytes = shape[1] * shape[2] * shape[3] * torch.empty((), dtype=dtype).element_size()
        self.length = 0
        if tier == Tier.DISK:
            self.buf = None
            path.unlink(missing_ok=True)
        else:
            on = device if tier == Tier.GPU else torch.device("cpu")
            pin = tier == Tier.CPU and device.type == "cuda"
            self.buf = torch.empty(shape, dtype=dtype, device=on, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def read(self) -> torch.Tensor | None:
        """The cached positions so far: [T, 2, B, h] (None when empty)."""
        if self.length == 0:
            return None
        if self.buf is not None:
            return self.buf[: self.length]
        raw = self.disk.read(self.path, 0, self.length * self.row_bytes)
        return raw.view(self.dtype).view(self.length, *self.shape[1:])

    def append(self, new: torch.Tensor) -> None:
        """new: [s, 2, B, h] — the keys and values of the positions just computed."""
        s = new.shape[0]
        if self.buf is not None:
            self.buf[self.length: self.length + s].copy_(new)
        else:
            self.disk.write(self.path, self.length * self.row_bytes, new.to("cpu").contiguous())
        self.length += s

    def close(self) -> None:
        self.buf = None
        if self.tier == Tier.DISK:
            self.path.unlink(missing_ok=True)
