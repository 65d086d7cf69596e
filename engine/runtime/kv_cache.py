"""The KV cache of one block, one slot per (decoder layer, micro-batch), split across tiers.

A slot's keys and values are (row, head) pairs: [max_len, 2, B*H, head_dim]. The policy's cache
percents split the pairs of every slot the same way (FlexGen splits its cache tensors along the
batch x heads dimension too): the first pairs on the GPU, the next in RAM, the rest on disk, so
every layer moves the same share of its cache and the cost model's per-layer fractions hold.
Attention is independent per pair, so each part is attended on its own and no split cache is
ever reassembled.

Layout of a part in memory (GPU or RAM), uncompressed: attention's own (`AlignedPairs`), keys and
values pair-major with each pair's first real position at index 0, so a decode step's attention
reads the cache in place instead of copying it into that layout every layer and step.
Layout of a part on disk: position-major, so appending a decode step is one contiguous write and
reading the first T positions is one contiguous read. With `compress_cache` a part holds three
position-major planes on any tier (4-bit codes, fp16 scales, fp16 minimums; groups along head_dim,
FlexGen's scheme), written and read the same way, and dequantised on the compute device right
before attention.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.model.kernel_shapes import key_capacity
from engine.model import native_attention
from engine.model.attention import pair_runs
from engine.runtime.compression import QuantizedTensor, dequantize, quantize
from engine.runtime.placement import cache_pair_split
from engine.runtime.policy import CompressionConfig
from engine.runtime.tiers import DiskTier, Tier, TransferStats, aligned_empty, to_device, zeroed


class Plane:
    """One position-major array [max_len, *row_shape] of a part, in memory or in a file."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, max_len: int, tier: Tier,
                 device: torch.device, disk: DiskTier, path: Path) -> None:
        self.row_shape, self.dtype, self.tier, self.disk, self.path = row_shape, dtype, tier, disk, path
        self.max_len = max_len
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

    def read(self, length: int, buffers: dict[int, torch.Tensor] | None = None, key: int = 0,
             room: int = 0) -> torch.Tensor:
        """The first `length` rows. From disk, into `buffers[key]` when given (kept and reused by
        the caller: a fresh multi-MB buffer per read costs page faults on the I/O thread, which
        stall the compute thread's own allocations), else into a fresh buffer. With buffers,
        `room` more rows follow the ones read (contents undefined): the caller writes the step's
        new position there instead of concatenating a copy of the whole cache."""
        if self.buf is not None:
            return self.buf[:length]
        nbytes = length * self.row_bytes
        if buffers is None:
            raw = self.disk.read(self.path, 0, nbytes)
        else:
            if key not in buffers or buffers[key].numel() < self.max_len * self.row_bytes:
                buffers[key] = aligned_empty(self.max_len * self.row_bytes)
            self.disk.read_into(self.path, 0, buffers[key][:nbytes])
            length = min(length + room, self.max_len)
            raw = buffers[key][:length * self.row_bytes]
        return raw.view(self.dtype).view(length, *self.row_shape)

    def close(self) -> None:
        self.buf = None
        if self.tier == Tier.DISK:
            self.path.unlink(missing_ok=True)


class AlignedPairs:
    """Keys and values of `count` pairs, each [count, capacity, head_dim] and zero-filled, with pair
    p's position P at index P - first[p]: the layout `attention.attend_aligned` reads in place. The
    capacity is max_len rounded up to KEY_ALIGN, so every key count attention asks for is there."""

    def __init__(self, first: torch.Tensor, max_len: int, head_dim: int, dtype: torch.dtype,
                 on: torch.device, pin: bool) -> None:
        count = first.shape[0]
        self.keys, self.values = (zeroed((count, key_capacity(max_len), head_dim), dtype, on, pin=pin)
                                  for _ in range(2))
        self.first = first.to(on)
        self.runs, start = [], 0  # (shift, first pair, pair count) of each run of pairs that share `first`
        for shift, run in pair_runs(first):
            self.runs.append((shift, start, run))
            start += run
        self.last_shift = max(shift for shift, _, _ in self.runs) if self.runs else 0
        self.pair_index = torch.arange(count, device=on)

    def write(self, start: int, rows: torch.Tensor) -> None:
        """rows: [s, 2, count, head_dim], the keys and values of positions start .. start+s-1
        (a pair's positions before its first real one are padding, not stored)."""
        s = rows.shape[0]
        rows = rows.to(self.keys.device)
        if s == 1 and start >= self.last_shift:  # a decode step: one position per pair, scattered
            at = start - self.first
            if not native_attention.write_positions(self.keys, self.values, rows[0, 0], rows[0, 1], at):
                self.keys[self.pair_index, at] = rows[0, 0]
                self.values[self.pair_index, at] = rows[0, 1]
            return
        for shift, lo, run in self.runs:
            skip = max(shift - start, 0)
            if skip >= s:
                continue
            at, pairs = start + skip - shift, slice(lo, lo + run)
            self.keys[pairs, at:at + s - skip] = rows[skip:, 0, pairs].transpose(0, 1)
            self.values[pairs, at:at + s - skip] = rows[skip:, 1, pairs].transpose(0, 1)

    def write_heads(self, start: int, k: torch.Tensor, v: torch.Tensor, first_pair: int) -> None:
        """`write` from the projections' own layout: k, v [B, s, H * D] (or [B, s, H, D]) of a
        micro-batch (pair = row * H + head), of which these are pairs first_pair .. first_pair +
        count - 1. One strided copy per whole rows of a run, none through the position-major layout
        (for a 32-row opt-1.3b prefill in bfloat16 that detour cost 39 ms a layer, this 1.5)."""
        head_dim = self.keys.shape[-1]
        k, v = k.view(*k.shape[:2], -1, head_dim), v.view(*v.shape[:2], -1, head_dim)
        s, H = k.shape[1], k.shape[2]
        for shift, lo, run in self.runs:
            skip = max(shift - start, 0)
            if skip >= s:
                continue
            at = slice(start + skip - shift, start + s - shift)
            pair = first_pair + lo
            while pair < first_pair + lo + run:  # a partial row, whole rows, a partial row
                row, head = divmod(pair, H)
                rows = (first_pair + lo + run - pair) // H if head == 0 else 0
                dst = pair - first_pair
                if rows:
                    for cache, new in ((self.keys, k), (self.values, v)):
                        cache[dst:dst + rows * H].view(rows, H, *cache.shape[1:])[:, :, at].copy_(
                            new[row:row + rows, skip:].transpose(1, 2))
                    pair += rows * H
                else:
                    heads = min(H - head, first_pair + lo + run - pair)
                    for cache, new in ((self.keys, k), (self.values, v)):
                        cache[dst:dst + heads, at].copy_(new[row, skip:, head:head + heads].transpose(0, 1))
                    pair += heads

    def read(self, length: int) -> torch.Tensor:
        """The first `length` positions in the position-major layout [length, 2, count, head_dim]
        (zeros at padding positions)."""
        out = self.keys.new_zeros((length, 2, self.keys.shape[0], self.keys.shape[2]))
        for shift, lo, run in self.runs:
            pairs = slice(lo, lo + run)
            out[shift:, 0, pairs] = self.keys[pairs, :max(length - shift, 0)].transpose(0, 1)
            out[shift:, 1, pairs] = self.values[pairs, :max(length - shift, 0)].transpose(0, 1)
        return out


class CachePart:
    """Pairs [first, first + count) of a slot, on one tier: [max_len, 2, count, head_dim]."""

    def __init__(self, tier: Tier, first: int, count: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, disk: DiskTier, path: Path,
                 compression: CompressionConfig | None, first_position: torch.Tensor) -> None:
        """first_position: [count] long, each pair's first real position (left padding before it)."""
        self.tier, self.pairs, self.dtype, self.compression = tier, slice(first, first + count), dtype, compression
        self.count, self.head_dim = count, head_dim
        self.length = 0
        self.aligned: AlignedPairs | None = None
        self.planes: list[Plane] = []
        if compression is None and tier != Tier.DISK:
            on = device if tier == Tier.GPU else torch.device("cpu")
            self.aligned = AlignedPairs(first_position, max_len, head_dim, dtype, on,
                                        pin=tier == Tier.CPU and device.type == "cuda")
        elif compression is None:
            self.planes = [Plane((2, count, head_dim), dtype, max_len, tier, device, disk, path)]
        else:
            # Learn the planes' row shapes from one quantised position.
            probe = quantize(torch.zeros(1, 2, count, head_dim), num_bits=compression.num_bits,
                             group_size=compression.group_size)
            self.planes = [Plane(tuple(t.shape[1:]), t.dtype, max_len, tier, device, disk,
                                 path.with_suffix(f".{name}"))
                           for name, t in (("codes", probe.data), ("scale", probe.scale),
                                           ("min", probe.minimum))]

    def read(self, device: torch.device | None = None, stats: TransferStats | None = None,
             buffers: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """The cached positions so far, [T, 2, count, head_dim], on `device` (default: where the part
        lives). Compressed planes are moved first and dequantised there: 4x fewer bytes cross the link.
        A disk part reads into `buffers` (see Plane.read): the result is valid until they are reused,
        and an uncompressed one then has one more row, [T + 1, ...], for the caller's new position."""
        if self.length == 0:
            return None
        if self.aligned is not None:
            full = self.aligned.read(self.length)
            return to_device(full, device, stats) if device is not None and stats is not None else full
        room = 1 if self.compression is None else 0
        planes = [p.read(self.length, buffers, i, room) for i, p in enumerate(self.planes)]
        if device is not None and stats is not None:
            planes = [to_device(p, device, stats) for p in planes]
        if self.compression is None:
            return planes[0]
        q = QuantizedTensor(data=planes[0], scale=planes[1], minimum=planes[2],
                            shape=(self.length, 2, self.count, self.head_dim), dim=3,
                            group_size=self.compression.group_size, num_bits=self.compression.num_bits)
        return dequantize(q, self.dtype)

    def encode(self, new: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """What the part stores for positions just computed (new: [s, 2, count, head_dim]): new
        itself, or its quantised form; encoded once, both written and attended."""
        if self.compression is None or isinstance(new, QuantizedTensor):
            return new
        return quantize(new, num_bits=self.compression.num_bits, group_size=self.compression.group_size)

    def attended(self, stored: torch.Tensor | QuantizedTensor) -> torch.Tensor:
        """What attention reads for stored positions: the cache's own copy, the newest position
        included, so a decode step sees what a prefill of the same positions sees."""
        return dequantize(stored, self.dtype) if isinstance(stored, QuantizedTensor) else stored

    def append(self, new: torch.Tensor | QuantizedTensor) -> None:
        """new: [s, 2, count, head_dim], this part's keys and values of the positions just computed
        (raw, or as `encode` gave them)."""
        stored = self.encode(new)
        if self.aligned is not None:
            self.aligned.write(self.length, stored)
        elif isinstance(stored, QuantizedTensor):
            for plane, part in zip(self.planes, (stored.data, stored.scale, stored.minimum)):
                plane.write(self.length, part)
        else:
            self.planes[0].write(self.length, stored)
        self.length += stored.shape[0]

    def append_heads(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """`append` for a part in the aligned layout, from the micro-batch's keys and values as the
        projections give them: k, v [B, s, H * D] (this part's pairs are taken from them)."""
        self.aligned.write_heads(self.length, k, v, self.pairs.start)
        self.length += k.shape[1]

    def close(self) -> None:
        self.aligned = None
        for p in self.planes:
            p.close()


class CacheSlot:
    """The cache of one (layer, micro-batch): up to three parts, GPU pairs first, then RAM, then disk."""

    def __init__(self, rows: int, max_len: int, num_heads: int, head_dim: int, gpu_percent: float,
                 cpu_percent: float, dtype: torch.dtype, device: torch.device, disk: DiskTier, path: Path,
                 *, compression: CompressionConfig | None = None, first: torch.Tensor | None = None) -> None:
        """first: [rows * num_heads] long, each pair's first real position (default 0: no padding)."""
        if first is None:
            first = torch.zeros(rows * num_heads, dtype=torch.long)
        first = first.cpu()
        counts = cache_pair_split(rows * num_heads, gpu_percent, cpu_percent)
        self.parts, first_pair = [], 0
        for tier, count in zip((Tier.GPU, Tier.CPU, Tier.DISK), counts):
            if count:
                self.parts.append(CachePart(tier, first_pair, count, max_len, head_dim, dtype, device, disk,
                                            path.with_name(f"{path.stem}-{tier.value}{path.suffix}"),
                                            compression, first[first_pair:first_pair + count]))
                first_pair += count

    @property
    def disk_part(self) -> CachePart | None:
        return next((p for p in self.parts if p.tier == Tier.DISK), None)

    def close(self) -> None:
        for p in self.parts:
            p.close()
