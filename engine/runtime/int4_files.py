"""The fused 4-bit kernel's operands of a store's matrices, on disk: written once per layer, so a
matrix streamed from the disk tier each step is read straight into the kernel's layout and used
as it lies in the read buffer (repacking the store's bytes each step cost about as much time as
the disk saved: opt-1.3b, ~1 s a step on two cores, the transposition of bytes dominating).

One file per layer, <store root>/int4pack-f<F>/<layer>.bin, F the kernel's features per block on
this CPU (the layout differs between torch's AVX-512 and AVX2 kernels, and a store may be read by
both kinds of host): per fused matrix, in store order, its packed
codes (uint8 [out, in / 2], engine.model.int4_matmul's layout) then its scales and zeros
(bfloat16 [in / group, out, 2]), each section on a page boundary (O_DIRECT). As many bytes as the
store's copy. Written once (tiers.write_once): a file that exists is complete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.model import int4_matmul
from engine.model.checkpoint import TensorEntry
from engine.model.int4_matmul import Int4Weight
from engine.runtime.compression import from_bytes
from engine.runtime.tiers import align_up, write_once


@dataclass(frozen=True)
class Span:
    """Where one matrix's operands sit in its layer's file."""
    offset: int
    packed: int  # bytes of the codes
    scales: int  # bytes of the scales and zeros

    @property
    def nbytes(self) -> int:
        return align_up(self.packed) + align_up(self.scales)


def spans(entries: list[TensorEntry]) -> dict[str, Span]:
    """The span of each of `entries` (the layer's fused matrices, in store order)."""
    out, at = {}, 0
    for e in entries:
        n, k = e.shape
        out[e.name] = span = Span(at, n * k // 2, (k // e.group_size) * n * 4)
        at += span.nbytes
    return out


class KernelLayoutFiles:
    def __init__(self, store_root: Path) -> None:
        self.dir = store_root / f"int4pack-f{int4_matmul.features_per_block()}"

    def path(self, layer: str) -> Path:
        return self.dir / f"{layer}.bin"

    def ensure(self, layer: str, entries: list[TensorEntry], read: Callable[[TensorEntry], torch.Tensor]) -> None:
        """Write `layer`'s file unless it exists; `read(entry)` gives an entry's stored bytes."""
        def write(f) -> None:
            for entry, span in zip(entries, spans(entries).values()):
                q = from_bytes(read(entry), entry.shape, num_bits=entry.num_bits, group_size=entry.group_size)
                weight = int4_matmul.pack(q)
                f.seek(span.offset)
                f.write(weight.packed.numpy().tobytes())
                f.seek(span.offset + align_up(span.packed))
                f.write(weight.scales_and_zeros.view(torch.uint8).numpy().tobytes())
            f.truncate(sum(s.nbytes for s in spans(entries).values()))

        write_once(self.path(layer), write)

    @staticmethod
    def weight(buf: torch.Tensor, entry: TensorEntry, span: Span) -> Int4Weight:
        """Zero-copy operands of `entry` from `buf`, the bytes of its span."""
        n, k = entry.shape
        packed = buf[:span.packed].view(n, k // 2)
        at = align_up(span.packed)
        scales = buf[at:at + span.scales].view(torch.bfloat16).view(k // entry.group_size, n, 2)
        return Int4Weight(packed=packed, scales_and_zeros=scales, group_size=entry.group_size)
