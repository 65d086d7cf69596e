"""Memory terms of the cost model: peak bytes per tier of a block under a placement.

Home: what lives on the tier for the whole run. Working: double buffers for what streams in,
decompressed copies, and the largest intermediate of one micro-batch. Like the time terms, every
figure is linear in the placement fractions (floats, numpy arrays or pulp expressions).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.model.config import OPTConfig
from engine.planning.cost_inputs import (Placement, Shape, Sizes, elem_bytes, four_bit_prompt_copy, sizes,
                                         weight_split)
from engine.planning.cost_time import resource_max
from engine.planning.hardware import HardwareProfile
from engine.runtime.budgets import (MemoryEstimate, StoreLayout, cache_buffer_slots, cache_quantize_scratch_bytes,
                                   estimate_memory, freed_bytes_to_keep, prefill_working_bytes)
from engine.runtime.devices import torch_dtype
from engine.runtime.policy import Policy
from engine.runtime.weight_tiers import streams_converted_copies


@dataclass(frozen=True)
class _Weights:
    """The weights' part of the peaks: what memory (GPU and RAM together) holds, the GPU tier's
    share, the RAM staging of what streams from disk, and what the disk holds."""
    held: Any
    on_gpu: Any
    staging: Any
    disk: Any
    activations_on_disk: Any  # 1 where any activation slot is on disk (exact), else the fraction


def _weights(cfg: OPTConfig, z: Sizes, x: Placement, *, exact: bool, in_place: bool) -> _Weights:
    """`in_place`: every streamed matrix is used as it was read (no converted copy): 4-bit ones by a
    kernel, uncompressed ones from their converted copy (engine.runtime.weight_tiers.read_in_place)."""
    ws = weight_split(cfg, x, exact=exact)
    if exact:  # floats or numpy arrays
        # Streamed decoder layers: converted copies kept for two layers (the one computing, the
        # one read ahead) and raw read buffers for one; a streamed head: its converted copy and
        # its raw read. Multiplied in place: read buffers for two layers, and for the head.
        # Lookup tables on disk need only the rows they gather.
        layer_staging, head_staging = (2 * z.w_disk, z.head_disk) if in_place else (2 * z.w + z.w_disk,
                                                                                    z.head + z.head_disk)
        staging = (np.where(np.asarray(ws.layers_on_disk) > 1e-9, layer_staging, 0.0)
                   + np.where(np.asarray(ws.head_on_disk) > 1e-9, head_staging, 0.0))
        acts_on_disk = np.where(np.asarray(x.hd) > 1e-9, 1.0, 0.0)
    else:
        staging, acts_on_disk = 2 * z.w * ws.layers_on_disk, x.hd
    held = (cfg.num_layers * z.w * (1 - ws.layers_on_disk) + z.head * (1 - ws.head_on_disk)
            + z.lookup * ws.lookup_held)
    disk = (cfg.num_layers * z.w_disk * ws.layers_on_disk + z.head_disk * ws.head_on_disk
            + z.lookup_disk * (1 - ws.lookup_held))
    return _Weights(held=held, on_gpu=ws.matmul_on_gpu * (cfg.num_layers * z.w + z.head), staging=staging,
                    disk=disk, activations_on_disk=acts_on_disk)


@dataclass(frozen=True)
class _Phase:
    """One phase's activations: all of the block's, one micro-batch's, and its largest intermediate."""
    act: float
    act_mb: float
    inter: float
    decode: bool


def _phases(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, z: Sizes) -> tuple[_Phase, _Phase]:
    b, s, n, h, f, nh = (sh.gpu_batch_size, sh.prompt_len, sh.gen_len, cfg.hidden_size, cfg.mlp_width,
                         cfg.num_heads)
    el = elem_bytes(hw)
    # Largest live intermediates of one micro-batch: attention (q,k,v + scores + probs) or MLP.
    inter_pre = el * b * (max(3 * s * h + 2 * nh * s * s, s * f + s * h) + s * h)
    # ... and never below what the engine's own budget check counts (engine.runtime.budgets), which a
    # planned policy must pass, for the parts that depend neither on the placement nor on compression.
    in_memory = Policy.from_percents([100, 0, 100, 0, 100, 0], gpu_batch_size=b)
    inter_pre = max(inter_pre, prefill_working_bytes(cfg, in_memory, s, s + max(n - 1, 0), el))
    # A decode step's MLP runs over the whole block at once; its attention per micro-batch.
    B = sh.block_size
    inter_dec = el * (max(b * (3 * h + 2 * nh * (s + n)), B * (f + h)) + B * h) + 4 * b * cfg.vocab_size
    return (_Phase(z.act_pre, b * s * h * el, inter_pre, False),
            _Phase(z.act_dec, b * h * el, inter_dec, True))


def _ram_only_peak(sh: Shape, z: Sizes, x: Placement, w: _Weights, p: _Phase, w_work16: Any,
                   kv_work16: Any) -> Any:
    """Without a GPU one memory holds the "gpu" and "cpu" shares; weights resident in RAM are used
    in place, only what comes from disk needs double buffers."""
    home = w.held + (x.cg + x.cc) * z.kv_total + (x.hg + x.hc) * p.act
    work = w.staging + w_work16 + kv_work16 + 2 * p.act_mb * w.activations_on_disk + p.inter
    if p.decode:  # the disk part's read buffers and a copy with the new position (budgets._cache_bytes)
        work = work + cache_buffer_slots(sh.num_gpu_batches) * z.kv_mb_full * x.cd
    return home + work


def _gpu_peak(sh: Shape, z: Sizes, x: Placement, w: _Weights, p: _Phase, w_work16: Any, kv_work16: Any) -> Any:
    home = w.on_gpu + x.cg * z.kv_total + x.hg * p.act
    work = 2 * z.w * (1 - x.wg) + w_work16 + 2 * p.act_mb * (1 - x.hg) + p.inter
    if p.decode:
        moved = x.cg * 0.0 + (0.0 if sh.cpu_cache_compute else 1.0) * (x.cc + x.cd)
        work = work + 2 * z.kv_mb_full * moved + kv_work16
    else:
        s, n = sh.prompt_len, sh.gen_len
        work = work + 2 * (z.kv_mb_full * s / (s + n)) * (1 - x.cg) + kv_work16  # new cache waiting to be stored
    return home + work


def _cpu_peak(cfg: OPTConfig, sh: Shape, z: Sizes, x: Placement, w: _Weights, p: _Phase, kv_work16: Any) -> Any:
    home = w.held - w.on_gpu + x.cc * z.kv_total + x.hc * p.act
    work = w.staging + 2 * p.act_mb * w.activations_on_disk  # staging buffers for what comes from disk
    if p.decode:
        work = work + cache_buffer_slots(sh.num_gpu_batches) * z.kv_mb_full * x.cd
        if sh.cpu_cache_compute:  # scores of one micro-batch in fp32 on the CPU
            work = work + 4 * sh.gpu_batch_size * cfg.num_heads * (sh.prompt_len + sh.gen_len) + kv_work16
    return home + work


def memory_peaks(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
                 exact: bool = False) -> dict[str, list[Any]]:
    """Peak bytes per tier, as a list of candidates per tier (the peak is their max: one per phase).

    The engine moves activations by whole (layer, micro-batch) slots, so any slot on disk needs
    full-slot staging buffers. That is a step, not linear in the disk fraction: the LP uses the
    linear relaxation (staging x fraction, optimistic), `exact` (floats only) the step; the planner
    re-solves with a tighter budget when the exact figure does not fit. The cache is split inside
    every slot (placement.cache_pair_split), so its staging is linear in the disk fraction."""
    z = sizes(cfg, sh, hw)
    prompt_copy = four_bit_prompt_copy(cfg, sh, hw)
    in_place = (prompt_copy is not None if sh.compress_weight
                else streams_converted_copies(torch_dtype(hw.compute_dtype), torch.device(hw.compute_device)))
    w = _weights(cfg, z, x, exact=exact, in_place=in_place)
    phases = _phases(cfg, hw, sh, z)
    # Dequantised copies are made into buffers the engine keeps: two decoder layers' (alternating)
    # and the output head's (the embedding table dequantises only the rows it gathers); where a
    # kernel multiplies the 4-bit matrices as they are, only prompt tokens' copy of one matrix.
    w_work16 = 0.0 if not sh.compress_weight else prompt_copy if prompt_copy is not None else 2 * z.w16 + z.head16
    # A compressed cache is attended as two uncompressed copies of a slot, after quantising scratch
    # (engine.runtime.budgets.prefill_working_bytes).
    kv_work16 = (2 * z.kv_mb_full16 + cache_quantize_scratch_bytes(cfg, sh.gpu_batch_size, sh.prompt_len)
                 if sh.compress_cache else 0.0)
    disk_peak = w.disk + x.cd * z.kv_total + x.hd * z.act_pre
    if not hw.has_gpu:
        return {"gpu": [], "cpu": [_ram_only_peak(sh, z, x, w, p, w_work16, kv_work16) for p in phases],
                "disk": [disk_peak]}
    return {"gpu": [_gpu_peak(sh, z, x, w, p, w_work16, kv_work16) for p in phases],
            "cpu": [_cpu_peak(cfg, sh, z, x, w, p, kv_work16) for p in phases],
            "disk": [disk_peak]}


def peak_bytes(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
               exact: bool = False) -> dict[str, Any]:
    out = {}
    for tier, cands in memory_peaks(cfg, hw, sh, x, exact=exact).items():
        out[tier] = resource_max({str(i): c for i, c in enumerate(cands)}, True) if cands else 0.0
    return out


def engine_memory(cfg: OPTConfig, hw: HardwareProfile, policy: Policy, *, prompt_len: int,
                  gen_len: int) -> MemoryEstimate:
    """What the engine's own budget check (engine.runtime.budgets.estimate_memory) counts for a
    policy on this hardware, without the process's own memory (the planner takes that off the CPU
    budget). This, not the linear model above, is the figure every plan must fit."""
    layout = StoreLayout.of(cfg, policy.compression if policy.compress_weight else None)
    device = torch.device("cuda" if hw.has_gpu else "cpu")
    return estimate_memory(cfg, layout, policy, device, torch_dtype(hw.compute_dtype), prompt_len=prompt_len,
                           gen_len=gen_len, process_bytes=0)


def engine_peak_bytes(est: MemoryEstimate) -> dict[str, int]:
    """`engine_memory`'s totals per tier."""
    return {"gpu": est.gpu_total, "cpu": est.cpu_total}


def keeps_prefill_intermediates(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, est: MemoryEstimate,
                                cpu_budget_gib: float | None) -> bool:
    """Whether the allocator keeps a prefill micro-batch's freed hidden-state-sized intermediates
    (q, k, v, LayerNorm and residual outputs) under this CPU budget, as the engine sets it
    (engine.runtime.budgets.freed_bytes_to_keep); a device other than the CPU computes elsewhere."""
    if hw.has_gpu:
        return True
    hidden_state = sh.gpu_batch_size * sh.prompt_len * cfg.hidden_size * elem_bytes(hw)
    return freed_bytes_to_keep(est, cpu_budget_gib) >= hidden_state
