"""The model's weights placed on tiers by a Policy, and the per-layer load the schedule calls.

Resident tensors (GPU/CPU tiers) are read once and kept in the compute dtype; disk tensors are
read every time their layer runs (with O_DIRECT), converted, and dropped after use. Compressed
(4-bit) tensors stay packed on every tier, in memory too: memory and link bytes both shrink ~3.5x.
A 4-bit matrix that torch's fused CPU kernel takes (bfloat16 without AVX512-BF16,
engine.model.int4_matmul) is held in that kernel's layout (same size) and multiplied without a
dequantised copy; on disk it is read from a copy in that layout (engine.runtime.int4_files, written
once). In float32 on the CPU, and in bfloat16 on a CPU with AVX512-BF16, flexjob's own kernels (engine.model.int4_float32,
engine.model.int4_bfloat16) multiply the stored bytes as they are, held or read. In bfloat16 on a CPU
an uncompressed tensor on disk is read from a copy converted once (engine.runtime.converted_files)
and used where it was read.
Other compressed tensors are dequantised on the compute device right before their layer runs. `replace`
re-places the model for a new policy, moving only the tensors whose tier changes.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from engine.model import four_bit, int4_matmul
from engine.model.int4_matmul import Int4Weight
from engine.model.kernels import pack_for_cpu
from engine.model.packed_weight import PackedWeight
from engine.runtime.converted_files import ConvertedFiles
from engine.runtime.int4_files import KernelLayoutFiles, Span, spans
from engine.runtime.compression import QuantizedTensor, dequantize, from_bytes, row_sections
from engine.model.config import ModelConfig
from engine.runtime.policy import Policy
from engine.runtime.tiers import (CPU_TO_GPU, DEQUANTIZE, DiskTier, Tier, TransferStats, align_up, aligned_empty,
                                  to_device)
from engine.runtime.weight_tiers import (ROW_LOOKUP_TABLES, bytes_by_tier, kernel_of, plan_weight_tiers,
                                         read_in_place)
from engine.model.checkpoint import TensorEntry, WeightStore, layer_names


# What the math receives per tensor name: a tensor, packed 4-bit codes (a lookup table), or a
# function from row ids to rows (a lookup table that stays where it is).
LayerTensor = Union[torch.Tensor, QuantizedTensor, Int4Weight, PackedWeight, Callable[[torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class FetchedLayer:
    """What `fetch` (I/O thread) hands to `finish` (compute thread) for one layer: the stored bytes
    of its disk tensors by name, or, on GPU hosts, its tensors already made ready."""
    layer: str
    raw: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: dict[str, LayerTensor] | None = None


def _as_quantized(buf: torch.Tensor, entry: TensorEntry) -> QuantizedTensor:
    """The stored compressed tensor inside a read buffer (or its resident copy), as views: no copy."""
    return from_bytes(buf, entry.shape, num_bits=entry.num_bits, group_size=entry.group_size, dim=-1)


def _as_fp16(buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The stored fp16 tensor inside a raw (aligned, padded) read buffer, as a view."""
    return buf[: entry.nbytes].view(torch.float16).view(entry.shape)


class PlacedWeights:
    def __init__(self, store: WeightStore, cfg: ModelConfig, policy: Policy, device: torch.device,
                 dtype: torch.dtype, disk: DiskTier, stats: TransferStats) -> None:
        self.store, self.cfg, self.device, self.dtype = store, cfg, device, dtype
        self.disk, self.stats = disk, stats
        self.tiers: dict[str, dict[str, Tier]] = {}
        self.resident: dict[str, dict[str, torch.Tensor]] = {}
        self._layer_index = {name: i for i, name in enumerate(layer_names(cfg))}
        self._dequant_buffers: dict[tuple, torch.Tensor] = {}
        self._kernel_files = KernelLayoutFiles(store.root)
        self._converted_files = ConvertedFiles(store.root, dtype)
        self._kernel_buffers: dict[tuple, torch.Tensor] = {}  # read buffers of tensors used in place, by slot
        self._stream_buffers: dict[tuple, torch.Tensor] = {}  # converted streamed tensors, by slot
        self._raw_buffers: dict[str, torch.Tensor] = {}  # aligned read buffers of one decoder layer, by tensor
        self._converted_layers: set[str] = set()  # layers whose converted copy is on disk (ConvertedFiles)
        self.replace(policy)

    def replace(self, policy: Policy) -> int:
        """Place for `policy`; returns the bytes whose tier changed."""
        new_tiers = plan_weight_tiers(self.store, self.cfg, policy)
        moved = 0
        for layer, tiers in new_tiers.items():
            resident = self.resident.setdefault(layer, {})
            for entry in self.store.layers[layer]:
                old, new = self.tiers.get(layer, {}).get(entry.name), tiers[entry.name]
                if old == new:
                    continue
                moved += entry.nbytes
                if new == Tier.DISK:
                    resident.pop(entry.name, None)
                    if self._fused(entry):
                        self._kernel_files.ensure(layer, self._fused_entries(layer),
                                                  lambda e, layer=layer: self._read_raw(layer, e, reuse=False))
                    elif self._converted(entry):
                        self._converted_files.ensure(layer, self.store.layers[layer],
                                                     lambda e, layer=layer: self._read_raw(layer, e, reuse=False))
                        self._converted_layers.add(layer)
                elif old in (Tier.GPU, Tier.CPU):
                    resident[entry.name] = self._place(resident[entry.name], new)
                else:
                    resident[entry.name] = self._held(layer, entry,
                                                      self._place(self._read(layer, entry, ready=False), new))
        self.tiers = new_tiers
        return moved

    def _fused(self, entry: TensorEntry) -> bool:
        """Whether `entry` runs on the fused 4-bit kernel, in its layout (engine.model.int4_matmul)."""
        return kernel_of(entry, self.dtype, self.device) is int4_matmul

    def _in_place(self, entry: TensorEntry) -> bool:
        """Whether `entry` is multiplied as its stored 4-bit bytes (engine.model.four_bit.READ_IN_PLACE)."""
        return kernel_of(entry, self.dtype, self.device) in four_bit.READ_IN_PLACE

    def _converted(self, entry: TensorEntry) -> bool:
        """Whether `entry`, streamed, is read from its copy converted to the compute dtype."""
        return not entry.compressed and read_in_place(entry, self.dtype, self.device)

    def _fused_entries(self, layer: str) -> list[TensorEntry]:
        return [e for e in self.store.layers[layer] if self._fused(e)]

    def _spans(self, layer: str) -> dict[str, Span]:
        return spans(self._fused_entries(layer))

    def _in_place_span(self, layer: str, entry: TensorEntry) -> tuple[Path, int, torch.Tensor]:
        """Where a streamed tensor used where it lies (a 4-bit matrix in the fused kernel's copy or as
        stored, a tensor in its converted copy) is read from, and the buffer it is read into, kept per
        (layer parity, tensor): the math uses it while the next layer is read. A stored 4-bit matrix
        of a layer that has a converted copy is read from that copy (the same bytes at the same
        offset), so that a layer's streamed tensors lie back to back in one file (one read)."""
        if self._fused(entry):
            span = self._spans(layer)[entry.name]
            path, offset, nbytes = self._kernel_files.path(layer), span.offset, span.nbytes
        elif self._converted(entry) or layer in self._converted_layers:
            path, offset, nbytes = self._converted_files.path(layer), entry.offset, align_up(entry.nbytes)
        else:
            path, offset, nbytes = self.store.path(layer), entry.offset, align_up(entry.nbytes)
        key = (self._slot(layer), entry.name, entry.shape)
        if key not in self._kernel_buffers:
            self._kernel_buffers[key] = aligned_empty(nbytes)
        return path, offset, self._kernel_buffers[key][:nbytes]

    def _held(self, layer: str, entry: TensorEntry, t: torch.Tensor) -> LayerTensor:
        """What a resident tensor is kept as: the fused kernel's operands (repacked once), the stored
        4-bit bytes as a QuantizedTensor (where the native kernel reads them), a decoder
        layer's matrix in the layout the CPU's math library would reorder it into on every call
        (packed once, where every token's library reads that layout: kernels.pack_for_cpu), or
        `t`. The head stays plain: it runs once a step, and its packed copy would be one more
        0.2-1 GB beside the plain one while it is made."""
        if self._fused(entry):
            return self._repacked(entry, t)
        if self._in_place(entry):
            return _as_quantized(t, entry)
        if self.device.type == "cpu" and not entry.compressed and layer.startswith("decoder."):
            return pack_for_cpu(t)
        return t

    def _repacked(self, entry: TensorEntry, packed: torch.Tensor) -> Int4Weight:
        """Stored 4-bit bytes -> the fused kernel's operands (timed like a dequantisation)."""
        started = time.perf_counter()
        q = _as_quantized(packed, entry)
        weight = int4_matmul.pack(q)
        self.stats.add(DEQUANTIZE, weight.packed.numel(), time.perf_counter() - started)
        return weight

    def _place(self, t: LayerTensor, tier: Tier) -> LayerTensor:
        if isinstance(t, (Int4Weight, PackedWeight, QuantizedTensor)):
            return t  # only made for a CPU compute device, where both memory tiers are RAM
        if tier == Tier.GPU:
            return t.to(self.device)
        t = t.to("cpu")
        return t.pin_memory() if self.device.type == "cuda" else t

    def _read(self, layer: str, entry: TensorEntry, *, ready: bool) -> torch.Tensor:
        """Read one tensor from the store into fresh CPU memory: fp16 tensors converted to the
        compute dtype; compressed ones as their packed bytes (dequantised later, by `_ready`)."""
        buf = self._read_raw(layer, entry, reuse=False)
        if entry.compressed:
            return self._ready(entry, buf, self._slot(layer)) if ready else buf
        fp16 = _as_fp16(buf, entry)
        return fp16 if entry.name in ROW_LOOKUP_TABLES else fp16.to(self.dtype)

    def _read_raw(self, layer: str, entry: TensorEntry, *, reuse: bool) -> torch.Tensor:
        """The tensor's stored bytes in an aligned buffer (O_DIRECT). `reuse` (streaming a decoder
        layer for one use): one buffer per tensor name, kept: fresh multi-MB buffers twice per
        tensor per step cost page faults (with 50 % of opt-1.3b streamed, a decode step spent more
        time faulting pages in than reading the disk)."""
        buf = self._raw_buffer(entry, reuse=reuse)
        self.disk.read_into(self.store.path(layer), entry.offset, buf)
        return buf

    def _raw_buffer(self, entry: TensorEntry, *, reuse: bool) -> torch.Tensor:
        size = align_up(entry.nbytes)
        if reuse and not entry.compressed:
            buf = self._raw_buffers.get(entry.name)
            if buf is None or buf.numel() < size:
                buf = self._raw_buffers[entry.name] = aligned_empty(size)
            return buf[:size]
        return aligned_empty(size)

    def _ready(self, entry: TensorEntry, packed: torch.Tensor, slot: int) -> torch.Tensor:
        """Dequantise a packed tensor on the compute device (only the packed bytes cross the link),
        into a reused buffer: a fresh multi-MB tensor per use costs page faults worth as much as the
        dequantisation itself. Two buffer sets alternate by layer (`slot`): the schedule holds at
        most the layer computing and the one being prefetched."""
        packed = to_device(packed, self.device, self.stats, CPU_TO_GPU)
        started = time.perf_counter()
        q = _as_quantized(packed, entry)
        out = dequantize(q, self.dtype, out=self._reused(self._dequant_buffers, slot, entry, self.device))
        # Counted like a link (output bytes, seconds) so benchmarks can report dequantisation time.
        self.stats.add(DEQUANTIZE, out.numel() * out.element_size(), time.perf_counter() - started)
        return out

    def _slot(self, layer: str) -> int:
        return self._layer_index[layer] % 2

    def _reused(self, buffers: dict, slot: int, entry: TensorEntry, device: torch.device) -> torch.Tensor:
        """The buffer of `entry`'s shape in the compute dtype for this layer parity, made once."""
        key = (slot, entry.name, entry.shape)
        if key not in buffers:
            buffers[key] = torch.empty(entry.shape, dtype=self.dtype, device=device)
        return buffers[key]

    def fetch(self, layer: str) -> FetchedLayer:
        """Stage one, on the I/O thread: the stored bytes of `layer`'s disk tensors. With a GPU it
        runs stage two too (conversion and dequantisation on the host overlap the GPU's compute).
        Without one, that work is left to `finish` on the compute thread: beside the compute
        threads it only oversubscribes the cores (opt-1.3b 4-bit, fp32 on 2 cores: dequantisation ran
        at 1.3 GB/s on the I/O thread against 2.5 inline, and each decode step took 18 % longer)."""
        decoder = layer.startswith("decoder.")  # the embedding and head are read once a step: no pinned copies
        raw, spans_by_file = {}, {}
        for e in self.store.layers[layer]:
            if self.tiers[layer][e.name] != Tier.DISK or e.name in ROW_LOOKUP_TABLES:
                continue
            if read_in_place(e, self.dtype, self.device):
                path, offset, buf = self._in_place_span(layer, e)
            else:
                path, offset, buf = self.store.path(layer), e.offset, self._raw_buffer(e, reuse=decoder)
            raw[e.name] = buf
            spans_by_file.setdefault(path, []).append((offset, buf))
        for path, file_spans in spans_by_file.items():  # tensors back to back in a file: one read
            self.disk.read_spans_into(path, sorted(file_spans, key=lambda span: span[0]))
        if self.device.type == "cuda":
            return FetchedLayer(layer, ready=self.finish(FetchedLayer(layer, raw=raw)))
        return FetchedLayer(layer, raw=raw)

    def finish(self, fetched: FetchedLayer) -> dict[str, LayerTensor]:
        """Stage two: stored bytes and resident tensors made ready on the compute device."""
        if fetched.ready is not None:
            return fetched.ready  # finished on the I/O thread (GPU hosts)
        layer = fetched.layer
        return {entry.name: (self._lookup_table(layer, entry) if entry.name in ROW_LOOKUP_TABLES
                             else self._matmul_weight(layer, entry, fetched.raw.get(entry.name)))
                for entry in self.store.layers[layer]}

    def _lookup_table(self, layer: str, entry: TensorEntry) -> LayerTensor:
        """A token or position table as the embedding uses it: a function gathering rows where the
        whole table should not move (on disk; in host RAM beside a GPU), packed 4-bit codes (the
        embedding dequantises only the rows it gathers), or the table on the compute device."""
        tier = self.tiers[layer][entry.name]
        if tier == Tier.DISK:
            # Read by rows when the ids are known (opt-1.3b: 32 rows of 4 KiB for a decode step,
            # against 206 MB for the whole table).
            return functools.partial(self._disk_rows, layer, entry)
        held = self.resident[layer][entry.name]
        if entry.compressed:
            packed = to_device(held, self.device, self.stats, CPU_TO_GPU)
            return _as_quantized(packed, entry)
        if tier == Tier.CPU and self.device.type == "cuda":
            return functools.partial(self._host_rows, held)
        return to_device(held, self.device, self.stats, CPU_TO_GPU)

    def _matmul_weight(self, layer: str, entry: TensorEntry, raw: torch.Tensor | None) -> torch.Tensor:
        """A weight, bias or LayerNorm tensor on the compute device in the compute dtype, from its
        stored bytes just read (`raw`) or from its resident copy."""
        if raw is None:
            held = self.resident[layer][entry.name]
            if isinstance(held, (Int4Weight, PackedWeight, QuantizedTensor)):
                return held
            if entry.compressed:
                return self._ready(entry, held, self._slot(layer))
            return to_device(held, self.device, self.stats, CPU_TO_GPU)
        if self._fused(entry):
            return KernelLayoutFiles.weight(raw, entry, self._spans(layer)[entry.name])
        if self._in_place(entry):
            return _as_quantized(raw, entry)
        if self._converted(entry):
            return self._converted_files.tensor(raw, entry)
        if entry.compressed:
            return self._ready(entry, raw, self._slot(layer))
        # Converted into a buffer kept per (layer parity, tensor): no page faults.
        held = self._reused(self._stream_buffers, self._slot(layer), entry, torch.device("cpu"))
        held.copy_(_as_fp16(raw, entry))
        return to_device(held, self.device, self.stats)

    def _disk_rows(self, layer: str, entry: TensorEntry, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of a lookup table on disk, in the compute dtype: the distinct rows read one
        by one (a 4-bit table: each row's codes, scales and minimums), or picked from the whole
        table when they would add up to more than a quarter of it (a long prompt's prefill)."""
        unique, inverse = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        n, num_rows = len(unique), entry.shape[0]
        # (offset, bytes per row) of each row-major section of the stored tensor
        sections = (row_sections(entry.shape, entry.num_bits, entry.group_size) if entry.compressed
                    else [(0, entry.nbytes // num_rows)])
        if n * sum(align_up(row + 4096) for _, row in sections) > entry.nbytes // 4:
            table = self._read_raw(layer, entry, reuse=False)
            parts = [table[at:at + row * num_rows].view(num_rows, row)[unique] for at, row in sections]
        else:
            parts = [self.disk.read_rows(self.store.path(layer), entry.offset + at, row, unique.tolist())
                     for at, row in sections]
        if entry.compressed:
            data, scale, minimum = parts
            rows = dequantize(QuantizedTensor(data=data.view(n, scale.shape[1] // 2, -1), scale=scale.view(torch.float16),
                                              minimum=minimum.view(torch.float16), shape=(n, *entry.shape[1:]),
                                              dim=1, group_size=entry.group_size, num_bits=entry.num_bits),
                              self.dtype)
        else:
            rows = parts[0].view(torch.float16).view(n, *entry.shape[1:]).to(self.dtype)
        return to_device(rows[inverse].view(*ids.shape, *entry.shape[1:]), self.device, self.stats)

    def _host_rows(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of a lookup table held in host RAM, gathered there: only they cross the link."""
        return to_device(table[ids.cpu()], self.device, self.stats)

    def bytes_by_tier(self) -> dict[Tier, int]:
        """Bytes of weights each tier holds (compute dtype, or packed when compressed)."""
        return bytes_by_tier(self.store, self.tiers, torch.empty((), dtype=self.dtype).element_size())

    def disk_bytes_per_step(self) -> int:
        """Bytes a step reads from the disk tier for the weights: each disk tensor once, in whole
        pages (O_DIRECT), but the lookup tables, of which only the rows a step needs are read."""
        return sum(align_up(e.nbytes) for layer, tiers in self.tiers.items() for e in self.store.layers[layer]
                   if tiers[e.name] == Tier.DISK and e.name not in ROW_LOOKUP_TABLES)

    def ram_bytes(self) -> int:
        """Bytes of weights held in host RAM (the CPU tier, and the GPU tier when the "GPU" is RAM)."""
        by_tier = self.bytes_by_tier()
        return by_tier[Tier.CPU] + (by_tier[Tier.GPU] if self.device.type != "cuda" else 0)
