"""Cost model of the zig-zag block schedule: time per layer and peak memory per tier.

Follows the FlexGen paper (Sheng et al. 2023, section 4.2) by idea: for one block of
B = gpu_batch_size * num_gpu_batches rows, a step (prefill, or one decode token) visits every
layer once; each layer's weights are loaded once and shared by the block's micro-batches, while
cache and activations move per micro-batch. Each resource (disk, cpu->gpu link, gpu->cpu link,
compute) is busy for a time linear in the placement fractions; with overlap a layer costs the max
of them, without it their sum. Changes from FlexLLMGen's experimental cost model:
- it works without a GPU: the compute device is then the CPU, the GPU fractions are RAM, the
  cpu<->gpu links cost nothing (the engine does the same);
- activations may live on disk; CPU attention (cpu_cache_compute) is modelled; compression
  shrinks stored and moved bytes and adds a decompression cost;
- disk reads and writes share one device, so their times add up in one "disk" term;
- compute is a roofline per micro-batch: max(FLOPs / FLOP/s, weight bytes / memory bandwidth),
  because a small-batch decode matmul streams its weights and is bound by memory, not FLOPs.

The terms live in three modules: engine.planning.cost_inputs (placement fractions, shape, bytes),
engine.planning.cost_time (busy time per resource) and engine.planning.cost_memory (peak bytes per
tier); this module combines them into step and block times and a policy's `Estimate`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.model.config import OPTConfig
from engine.planning.cost_inputs import GB, GIB, Placement, Shape
from engine.planning.cost_memory import engine_memory, engine_peak_bytes, keeps_prefill_intermediates, peak_bytes
from engine.planning.cost_time import phase_terms, resource_max
from engine.planning.hardware import HardwareProfile
from engine.runtime.policy import Policy

RESOURCES = ("disk", "cpu_to_gpu", "gpu_to_cpu", "compute")


@dataclass(frozen=True, kw_only=True)
class Estimate:
    tokens_per_s: float
    total_s: float          # one block: prefill + (gen_len - 1) decode steps
    prefill_s: float
    decode_step_s: float
    peak_gib: dict[str, float]
    bottleneck: str         # the busiest resource of a decode layer
    decode_terms_s: dict[str, float]  # per-resource busy time of one decode step (all stages)

    def fits(self, budgets_gib: dict[str, float | None], tol: float = 1e-6) -> bool:
        return all(lim is None or self.peak_gib[t] <= lim * (1 + tol) + 1e-9
                   for t, lim in budgets_gib.items())


def step_time(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *, decode: bool) -> Any:
    total = 0.0
    for count, terms in phase_terms(cfg, hw, sh, x, decode=decode):
        total = total + count * resource_max(terms, sh.overlap)
    return total


def block_time(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement) -> Any:
    """Seconds for one block: prefill (yields the first token) then gen_len - 1 decode steps."""
    return step_time(cfg, hw, sh, x, decode=False) + (sh.gen_len - 1) * step_time(cfg, hw, sh, x, decode=True)


def estimate(cfg: OPTConfig, hw: HardwareProfile, policy: Policy, *, prompt_len: int,
             gen_len: int, cpu_budget_gib: float | None = None) -> Estimate:
    """Predicted throughput and peak memory of a concrete policy (floats). `cpu_budget_gib`: the CPU
    budget for the engine's tensors (without the process's own memory, as the planner counts it;
    None: no budget). What it leaves beside the peak decides whether a prefill's freed
    intermediates are kept or faulted in anew in every layer (cost_memory.keeps_prefill_intermediates)."""
    memory = engine_memory(cfg, hw, policy, prompt_len=prompt_len, gen_len=gen_len)
    sh = Shape.from_policy(policy, prompt_len=prompt_len, gen_len=gen_len)
    sh = dataclasses.replace(sh, keeps_freed_blocks=keeps_prefill_intermediates(cfg, hw, sh, memory, cpu_budget_gib))
    x = Placement.from_policy(policy, cfg.num_kv_heads)
    pre = float(step_time(cfg, hw, sh, x, decode=False))
    dec = float(step_time(cfg, hw, sh, x, decode=True))
    total = pre + (gen_len - 1) * dec
    busy = {r: 0.0 for r in RESOURCES}
    for count, terms in phase_terms(cfg, hw, sh, x, decode=True):
        for r in RESOURCES:
            busy[r] += count * float(terms[r])
    # GPU and RAM peaks as the engine's budget check counts them (one memory model: a plan the
    # planner accepts is one the engine accepts); the disk's from the cost model.
    peaks = {**peak_bytes(cfg, hw, sh, x, exact=True),
             **engine_peak_bytes(memory)}
    return Estimate(
        tokens_per_s=sh.block_size * gen_len / total, total_s=total, prefill_s=pre, decode_step_s=dec,
        peak_gib={t: float(v) / GIB for t, v in peaks.items()},
        bottleneck=max(busy, key=busy.get), decode_terms_s=busy)


def traffic_per_token(cfg: OPTConfig, hw: HardwareProfile, policy: Policy, *, prompt_len: int,
                      gen_len: int) -> dict[str, float]:
    """Bytes each link moves per generated token (whole run), for comparing policies by traffic."""
    slow = hw.replace(disk_read_gbps=1 / GB, disk_write_gbps=1e30, cpu_to_gpu_gbps=1e30,
                      gpu_to_cpu_gbps=1e30)
    sh = Shape.from_policy(policy, prompt_len=prompt_len, gen_len=gen_len)
    x = Placement.from_policy(policy, cfg.num_kv_heads)
    # With a read bandwidth of 1 byte/s the disk term is the bytes read (writes cost ~0).
    read = 0.0
    for decode, times in ((False, 1), (True, gen_len - 1)):
        for count, terms in phase_terms(cfg, slow, sh, x, decode=decode):
            read += times * count * float(terms["disk"])
    return {"disk_read": read / (sh.block_size * gen_len)}
