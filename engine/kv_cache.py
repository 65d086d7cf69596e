"""The KV cache of one block, one slot per (decoder layer, micro-batch), each on its own tier.

Layout of a slot: [max_len, 2, B, h] — position-major, so appending a decode step is one contiguous
write and reading the first T positions is one contiguous read, on every tier (a disk slot is a
file with the same layout). With `compress_cache` a slot holds three position-major planes instead
(4-bit codes, fp16 scales, fp16 minimums; groups along head_dim, FlexGen's scheme), written and read
the same way, and dequantised on the compute device right before attention.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.compression import QuantizedTensor, dequantize, quantize
from engine.policy import CompressionConfig
from engine.tiers import DiskTier, Tier, TransferStats, to_device


class Plane:
    """One position-major array [max_len, *row_shape] of a slot, in memory or in a file."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, max_len: int, tier: Tier,
                 device: torch.device, disk: DiskTier, path: Path) -> None:
        self.row_shape, self.dtype, self.tier, self.disk, self.path = row_shape, dtype, tier, disk, path
        self.row_bytes = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
        if tier == Tier.DISK:
            self.buf = None
            path.unlink(missing_ok=True)
        else:
            on = device if tier == Tier.GPU else torch.device("cpu")
            pin = tier == Tier.CPU and device.type == "cuda"
            self.buf = torch.empty((max_len, *row_shape), dtype=dtype, device=on, pin_memory=pin)

    def write(self, start: int, rows: torch.Tensor) -> None:
        if self.buf is not None:
            self.buf[start: start + rows.shape[0]].copy_(rows)
        else:
            self.disk.write(self.path, start * self.row_bytes, rows.to("cpu").contiguous())

    def read(self, length: int) -> torch.Tensor:
        if self.buf is not None:
            return self.buf[:length]
        raw = self.disk.read(self.path, 0, length * self.row_bytes)
        return raw.view(self.dtype).view(length, *self.row_shape)

    def close(self) -> None:
        self.buf = None
        if self.tier == Tier.DISK:
            self.path.unlink(missing_ok=True)


class CacheSlot:
    def __init__(self, tier: Tier, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device, disk: DiskTier, path: Path, *, num_heads: int,
                 compression: CompressionConfig | None = None) -> None:
        self.tier, self.shape, self.dtype, self.device = tier, shape, dtype, device
        self.compression, self.num_heads = compression, num_heads
        max_len, two, B, hidden = shape
        self.length = 0
        if compression is None:
            self.planes = [Plane((two, B, hidden), dtype, max_len, tier, device, disk, path)]
        else:
            # Learn the planes' row shapes from one quantised position.
            probe = quantize(torch.zeros(1, two, B, num_heads, hidden // num_heads),
                             num_bits=compression.num_bits, group_size=compression.group_size)
            self.planes = [Plane(tuple(t.shape[1:]), t.dtype, max_len, tier, device, disk,
                                 path.with_suffix(f".{name}"))
                           for name, t in (("codes", probe.data), ("scale", probe.scale),
                                           ("min", probe.minimum))]

    def read(self, device: torch.device | None = None, stats: TransferStats | None = None) -> torch.Tensor | None:
        """The cached positions so far, [T, 2, B, h], on `device` (default: where the slot lives).
        Compressed planes are moved first and dequantised there: 4x fewer bytes cross the link."""
        if self.length == 0:
            return None
        planes = [p.read(self.length) for p in self.planes]
        if device is not None and stats is not None:
            planes = [to_device(p, device, stats) for p in planes]
        if self.compression is None:
            return planes[0]
        T, two, B, hidden = self.length, *self.shape[1:]
        q = QuantizedTensor(data=planes[0], scale=planes[1], minimum=planes[2],
                            shape=(T, two, B, self.num_heads, hidden // self.num_heads), dim=4,
                            group_size=self.compression.group_size, num_bits=self.compression.num_bits)
        return dequantize(q, self.dtype).view(T, two, B, hidden)

    def append(self, new: torch.Tensor) -> None:
        """new: [s, 2, B, h] — the keys and values of the positions just computed."""
        s = new.shape[0]
        if self.compression is None:
            self.planes[0].write(self.length, new)
        else:
            two, B, hidden = self.shape[1:]
            q = quantize(new.reshape(s, two, B, self.num_heads, hidden // self.num_heads),
                         num_bits=self.compression.num_bits, group_size=self.compression.group_size)
            for plane, part in zip(self.planes, (q.data, q.scale, q.minimum)):
                plane.write(self.length, part)
        self.length += s

    def close(self) -> None:
        for p in self.planes:
            p.close()
