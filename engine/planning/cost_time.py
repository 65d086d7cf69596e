"""Time terms of the cost model: how long each resource is busy for one step of a block.

Each resource (disk, cpu->gpu link, gpu->cpu link, compute) is busy for a time linear in the
placement fractions; with overlap a layer costs the max of them (`resource_max`), without it their
sum. Without a GPU the cpu<->gpu links cost nothing and the I/O thread's work shares the cores that
compute. Compute is a roofline per micro-batch (or the profile's measured linear-layer table),
scaled by the engine's own layer as the profiler calibrated it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.model.config import OPTConfig, model_key
from engine.model.kernel_shapes import (ATTENTION_OPS_PER_QUERY_GROUP, attended_scores, attention_calls,
                                        linear_calls)
from engine.planning.cost_inputs import (CACHE_DISK_PART_OPS, GB, OPS_PER_LAYER, TENSORS_PER_LAYER, Placement,
                                         Shape, Sizes, WeightSplit, compression_factor, elem_bytes,
                                         four_bit_prompt_copy, sizes, weight_split)
from engine.planning.hardware import PREFILL_KEPT, HardwareProfile
from engine.runtime.devices import torch_dtype
from engine.runtime.weight_tiers import streams_converted_copies

Terms = dict[str, Any]  # resource -> busy seconds (float, numpy array or pulp expression)


@dataclass(frozen=True)
class _Rates:
    """Seconds per byte of each transfer; the cpu<->gpu links are free without a GPU (RAM is RAM)."""
    read: float
    write: float
    c2g: float
    g2c: float
    dequant: float
    convert: float  # fp16 -> compute dtype of weights streamed from disk (0: none)

    @classmethod
    def of(cls, hw: HardwareProfile) -> "_Rates":
        gpu = hw.has_gpu
        # Nothing is converted per step where streamed tensors are read from converted copies.
        convert = (1.0 / (hw.convert_gbps * GB) if hw.convert_gbps and hw.compute_dtype != "float16"
                   and not streams_converted_copies(torch_dtype(hw.compute_dtype), torch.device(hw.compute_device))
                   else 0.0)
        return cls(read=1.0 / (hw.disk_read_gbps * GB), write=1.0 / (hw.disk_write_gbps * GB),
                   c2g=1.0 / (hw.cpu_to_gpu_gbps * GB) if gpu else 0.0,
                   g2c=1.0 / (hw.gpu_to_cpu_gbps * GB) if gpu else 0.0,
                   dequant=1.0 / (hw.dequant_gbps * GB), convert=convert)


def _compute_bw(hw: HardwareProfile) -> float:
    return (hw.gpu_mem_gbps if hw.has_gpu else hw.cpu_mem_gbps) * GB


def _matmul_time(hw: HardwareProfile, flops: float, weight_bytes: float, *, rows: float, calls: int,
                 streamed: bool = False, four_bit: bool = False) -> float:
    """`calls` linear layers of `rows` input rows over `weight_bytes` (compute dtype) each, `flops` in
    all. The engine's batch-invariant linear sends the rows in chunks of fixed sizes (the last one
    padded), each chunk one library call that streams the weights: the profile's measured table at
    each chunk's row count where there is one, else the roofline (the slower of doing the padded
    FLOPs and streaming the weights from device memory once per chunk). A 4-bit kernel
    (`four_bit`) takes every row in one call, at its own measured rate."""
    if four_bit and hw.linear_4bit_s_per_byte:
        return calls * hw.linear_seconds(rows, weight_bytes, four_bit=True)
    plan = linear_calls(rows, hw.compute_dtype)
    measured = [hw.linear_seconds(chunk_rows, weight_bytes, streamed=streamed) for _, chunk_rows in plan]
    if None not in measured:
        return calls * sum(chunks * seconds for (chunks, _), seconds in zip(plan, measured))
    chunks = sum(n for n, _ in plan)
    padded_flops = flops * sum(n * chunk_rows for n, chunk_rows in plan) / max(rows, 1.0)
    return max(padded_flops / hw.flops(), calls * chunks * weight_bytes / _compute_bw(hw))


def _convert_s(sh: Shape, fp16_bytes_from_disk: Any, r: _Rates) -> Any:
    """Converting fp16 weights streamed from disk to the compute dtype (4-bit ones are dequantised
    instead, charged apart)."""
    return 0.0 if sh.compress_weight else fp16_bytes_from_disk * r.convert


def _weight_and_activation_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, z: Sizes,
                                 ws: WeightSplit, r: _Rates, *, decode: bool, in_place: bool) -> Terms:
    """A decoder layer's weights, loaded once per step and shared by the block (the point of the
    zig-zag), its activations loaded and stored per micro-batch, and its dense compute. The store is
    fp16; an fp32 engine (and a bf16 one with a GPU) converts what it streams from disk (a bf16 one
    on a CPU reads converted copies: engine.runtime.converted_files). Without a GPU
    that conversion runs on the cores that compute, so it adds to compute rather than overlapping
    with it (the disk read itself is DMA and does overlap): `_layer_terms` adds it there, after
    the calibration's scale, which is a ratio for the layer's kernels, not for conversion."""
    gpu, tokens = hw.has_gpu, 1 if decode else sh.prompt_len
    act = z.act_dec if decode else z.act_pre
    disk = z.w_disk * ws.layers_on_disk * r.read + (_convert_s(sh, z.w16 * ws.layers_on_disk, r) if gpu else 0.0)
    c_to_g = z.w * (1 - ws.matmul_on_gpu) * r.c2g
    disk = disk + act * x.hd * (r.read + r.write)
    c_to_g = c_to_g + act * (x.hc + x.hd) * r.c2g
    g_to_c = act * (x.hc + x.hd) * r.g2c
    dense_flops = 2 * sh.block_size * tokens * cfg.layer_param_count()
    # A decode step's projections and MLP take the whole block's rows in one call (schedule._decode_layer).
    rows, calls = (sh.block_size, 1) if decode else (sh.gpu_batch_size * tokens, sh.num_gpu_batches)
    held = _matmul_time(hw, dense_flops, z.w16, rows=rows, calls=calls, four_bit=in_place and decode)
    # A CPU engine multiplies the matrices it streams from disk unpacked, at their own rate; a
    # 4-bit kernel (`in_place`) multiplies generated tokens the same way wherever the matrix lies.
    streamed = (_matmul_time(hw, dense_flops, z.w16, rows=rows, calls=calls, streamed=True)
                if not (gpu or (in_place and decode)) else held)
    compute = held + (streamed - held) * ws.layers_on_disk + calls * OPS_PER_LAYER * hw.op_overhead_s
    return {"disk": disk, "cpu_to_gpu": c_to_g, "gpu_to_cpu": g_to_c, "compute": compute}


def _cache_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, z: Sizes, r: _Rates,
                 t: Terms, *, decode: bool) -> Terms:
    """`t` plus the KV cache: prefill attends over s x s on the compute device and stores the new
    cache; decode reads the cache where it lives, or (cpu_cache_compute) attends on the CPU."""
    gpu, B, s, h = hw.has_gpu, sh.block_size, sh.prompt_len, cfg.hidden_size
    disk, c_to_g, g_to_c, compute = t["disk"], t["cpu_to_gpu"], t["gpu_to_cpu"], t["compute"]
    # Attention goes to the library in fixed query groups, a few ops each (kernel_shapes).
    groups = attention_calls(1 if decode else s * cfg.num_heads // cfg.num_kv_heads)
    compute = compute + sh.num_gpu_batches * groups * ATTENTION_OPS_PER_QUERY_GROUP * hw.op_overhead_s
    if not decode:
        compute = compute + 4 * B * attended_scores(s) * h / hw.flops()  # QK and PV, 2 flops a product
        g_to_c = g_to_c + z.kv_new_pre * (x.cc + x.cd) * r.g2c
        disk = disk + z.kv_new_pre * x.cd * r.write
        if sh.compress_cache:
            compute = compute + (z.kv_new_pre / compression_factor(sh.compression)) * r.dequant
        return {"disk": disk, "cpu_to_gpu": c_to_g, "gpu_to_cpu": g_to_c, "compute": compute}
    disk = disk + z.kv_dec * x.cd * r.read + z.kv_tok * x.cd * r.write
    compute = compute + sh.num_gpu_batches * x.has_cache_disk_part * CACHE_DISK_PART_OPS * hw.op_overhead_s
    g_to_c = g_to_c + z.kv_tok * (x.cc + x.cd) * r.g2c
    if sh.cpu_cache_compute and gpu:  # without a GPU all attention is on the CPU anyway
        # The CPU attends over its share (and the disk share, read into RAM): only the query
        # goes down and the attention output comes back up.
        compute = compute + z.kv_dec16 * x.cg / _compute_bw(hw) \
            + z.kv_dec16 * (x.cc + x.cd) / (hw.cpu_attention_gbps * GB)
        g_to_c = g_to_c + B * h * elem_bytes(hw) * (x.cc + x.cd) * r.g2c
        c_to_g = c_to_g + B * h * elem_bytes(hw) * (x.cc + x.cd) * r.c2g
    elif gpu:
        c_to_g = c_to_g + z.kv_dec * (x.cc + x.cd) * r.c2g
        compute = compute + z.kv_dec16 / (hw.gpu_mem_gbps * GB)
    elif hw.cpu_attention_in_place:  # the native kernel: each pair's context, wherever it lies
        compute = compute + z.kv_dec16 / (hw.cpu_attention_gbps * GB)
    else:
        # The library path reads whole KEY_ALIGN groups of keys, and a part it does not hold in
        # its aligned layout (on disk, or compressed) is copied into that layout first, every step
        # (each byte read and written: twice what the memory stream rate reads).
        copied = x.cd + (x.cg + x.cc if sh.compress_cache else 0.0)
        compute = compute + z.kv_att16 / (hw.cpu_attention_gbps * GB) \
            + 2 * z.kv_dec16 * copied / (hw.cpu_mem_gbps * GB)
    if sh.compress_cache:
        compute = compute + z.kv_dec16 * r.dequant
    return {"disk": disk, "cpu_to_gpu": c_to_g, "gpu_to_cpu": g_to_c, "compute": compute}


def _layer_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, z: Sizes, ws: WeightSplit,
                 r: _Rates, *, decode: bool, in_place: bool) -> Terms:
    """`in_place`: a kernel multiplies the 4-bit matrices as they are (cost_inputs.four_bit_prompt_copy):
    only prompt tokens dequantise, each micro-batch's call its matrix; else every step the layer."""
    t = _cache_terms(cfg, hw, sh, x, z, r,
                     _weight_and_activation_terms(cfg, hw, sh, x, z, ws, r, decode=decode, in_place=in_place),
                     decode=decode)
    # The engine's whole layer against the sum of its kernels (measured by the profiler).
    # A prefill is calibrated by the tokens of a micro-batch (its linear calls' rows), a decode step
    # by the block's rows.
    compute = t["compute"] * hw.scale_for(model_key(cfg), "decode" if decode else _prefill_part(cfg, hw, sh),
                                          sh.block_size if decode else sh.gpu_batch_size * sh.prompt_len)
    if sh.compress_weight and not (in_place and decode):
        compute = compute + z.w16 * r.dequant * (sh.num_gpu_batches if in_place else 1)
    if not hw.has_gpu:
        compute = compute + _convert_s(sh, z.w16 * ws.layers_on_disk, r)
    # Per-request disk latency: one request per tensor of a layer on disk (linear in the layers
    # there), per micro-batch's activations (linear stand-in) and per micro-batch's cache part on disk
    # (whatever its size): it dominates when small tensors or one-token cache appends go to disk.
    r_lat, w_lat, nb = hw.disk_read_latency_s, hw.disk_write_latency_s, sh.num_gpu_batches
    disk = t["disk"] + TENSORS_PER_LAYER * ws.layers_on_disk * r_lat + nb * x.hd * (r_lat + w_lat)
    disk = disk + nb * x.has_cache_disk_part * (w_lat + (r_lat if decode else 0.0))
    return {"disk": disk, "cpu_to_gpu": t["cpu_to_gpu"], "gpu_to_cpu": t["gpu_to_cpu"], "compute": compute}


def _prefill_part(cfg: OPTConfig, hw: HardwareProfile, sh: Shape) -> str:
    """The calibration point of a prefill layer: with its freed intermediates kept where the shape
    says the budget has room and the profile measured that case, else with each faulted in anew."""
    return PREFILL_KEPT if sh.keeps_freed_blocks and hw.has_scale(model_key(cfg), PREFILL_KEPT) else "prefill"


def _head_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, z: Sizes, ws: WeightSplit,
                r: _Rates, *, in_place: bool) -> Terms:
    """The output head (one position per row), loaded once per step. The lookup tables on disk are
    read by rows (a decode step: one per sequence), not charged. A 4-bit head that a kernel
    multiplies as it is (`in_place`) is never dequantised (its rows are generated tokens)."""
    gpu, B, b, nb = hw.has_gpu, sh.block_size, sh.gpu_batch_size, sh.num_gpu_batches
    compute = _matmul_time(hw, 2 * B * cfg.embed_dim * cfg.vocab_size, z.head16, rows=b, calls=nb, four_bit=in_place) \
        + nb * 3 * hw.op_overhead_s  # final LayerNorm, LM head, sampling
    compute = compute * hw.scale_for(model_key(cfg), "head", b)
    if sh.compress_weight and not in_place:
        compute = compute + z.head16 * r.dequant
    convert_s = _convert_s(sh, z.head16 * ws.head_on_disk, r)
    return {"disk": z.head_disk * ws.head_on_disk * r.read + (convert_s if gpu else 0.0),
            "cpu_to_gpu": z.head * (1 - ws.matmul_on_gpu) * r.c2g,
            "gpu_to_cpu": 0.0 * x.wd, "compute": compute + (0.0 if gpu else convert_s) + 0.0 * x.wd}


def phase_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
                decode: bool) -> list[tuple[int, Terms]]:
    """Busy time (s) of each resource for one step of the block, as [(count, {resource: time})]:
    the decoder layer (count = num_layers) and the embedding/output head (count 1)."""
    z, ws, r = sizes(cfg, sh, hw), weight_split(cfg, x), _Rates.of(hw)
    in_place = four_bit_prompt_copy(cfg, sh, hw) is not None
    layer = _layer_terms(cfg, hw, sh, x, z, ws, r, decode=decode, in_place=in_place)
    head = _head_terms(cfg, hw, sh, x, z, ws, r, in_place=in_place)
    if not hw.has_gpu:  # the I/O thread runs on the cores that compute: overlap is not free
        for stage in (layer, head):
            stage["compute"] = stage["compute"] + hw.io_compute_interference * stage["disk"]
    return [(cfg.num_layers, layer), (1, head)]


def resource_max(terms: Terms, overlap: bool) -> Any:
    """Time of one stage: the busiest resource with overlap, the sum of all without."""
    values = list(terms.values())
    if not overlap:
        return sum(values[1:], values[0])
    out = values[0]
    for v in values[1:]:
        out = np.maximum(out, v)
    return out
