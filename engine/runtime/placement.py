"""Which tier holds each tensor, from a Policy's percents.

Weights (`split_weights`): the embedding's lookup tables, read by rows (a step needs one row per
sequence), go to the slowest tier the policy gives weights; the output head and projections, which
a step reads whole and which cost as much RAM streamed (their converted copy is kept) as held, go to
the fastest tier with room in its share of the whole model; the decoder layers share what is left.
Decoder layers: tensors in store order, layer after layer; each goes to the fastest tier whose running
total stays within its share of the bytes seen so far (`split_layers`). A layer alone can only be
split at tensor boundaries (OPT: attention, fc1, fc2 a third each): FlexGen's per-layer midpoint
rule puts 67 % in RAM when asked for 50 or 60 %, which would put the planner's fractions off by up
to a sixth of the model. Carrying each layer's rounding into the next keeps every layer within one
tensor of the asked split (so streaming still overlaps each layer's compute) and the whole model
within one tensor below it, never above (the planner budgets RAM for the asked fraction).
Activations are split by slot: one slot per (layer, micro-batch), numbered layer-major, each on
the tier holding its midpoint. The KV cache is split inside every slot, by (row, head) pairs
(`cache_pair_split`): with whole slots per tier, the layers whose cache sat on disk carried all the
cache traffic while the others left the disk idle, and the LP's per-layer fractions were wrong.
On a host without CUDA the GPU tier is the same RAM as the CPU tier.
"""
from __future__ import annotations

import math

from engine.runtime.tiers import Tier


def tier_by_midpoint(start: float, size: float, total: float, gpu_percent: float, cpu_percent: float) -> Tier:
    mid = (start + size / 2) / total * 100.0 if total else 0.0
    if mid < gpu_percent:
        return Tier.GPU
    if mid < gpu_percent + cpu_percent:
        return Tier.CPU
    return Tier.DISK


def split_layers(layers: list[list[int]], gpu_percent: float, cpu_percent: float) -> list[list[Tier]]:
    """One tier per tensor of every layer (tensor byte sizes, in order), the model's total split as
    close to the percents as tensor sizes allow, never above them on the GPU or in RAM (the planner
    budgets memory for exactly the asked fractions): a tensor goes to the fastest tier whose running
    total, with it, stays within that tier's share of the bytes seen so far."""
    out: list[list[Tier]] = []
    seen = on_gpu = on_gpu_or_cpu = 0.0  # bytes so far: all, placed on GPU, placed on GPU or CPU
    eps = 1e-9
    for sizes in layers:
        seen += float(sum(sizes))
        gpu_cap, ram_cap = seen * gpu_percent / 100, seen * (gpu_percent + cpu_percent) / 100
        tiers = []
        for size in sizes:
            if on_gpu + size <= gpu_cap * (1 + eps):
                tier = Tier.GPU
                on_gpu += size
                on_gpu_or_cpu += size
            elif on_gpu_or_cpu + size <= ram_cap * (1 + eps):
                tier = Tier.CPU
                on_gpu_or_cpu += size
            else:
                tier = Tier.DISK
            tiers.append(tier)
        out.append(tiers)
    return out


LOOKUP, HEAD, LAYER = "lookup", "head", "layer"  # roles of a weight tensor in placement


def split_weights(layers: list[list[tuple[int, str]]], gpu_percent: float, cpu_percent: float
                  ) -> list[list[Tier]]:
    """One tier per (bytes, role) tensor of every layer. Bytes per tier stay within the percents of
    the whole model on the GPU and in RAM, except that lookup tables go to disk whenever the policy
    streams any weights (then less than asked sits in memory: never more)."""
    eps = 1e-9
    total = float(sum(size for layer in layers for size, _ in layer))
    gpu_share, memory_share = total * gpu_percent / 100, total * (gpu_percent + cpu_percent) / 100
    slowest = Tier.DISK if gpu_percent + cpu_percent < 100 - 1e-6 else Tier.CPU if cpu_percent > 0 else Tier.GPU
    out: list[list[Tier | None]] = [[None] * len(layer) for layer in layers]
    on_gpu = in_memory = 0.0  # bytes placed on the GPU, and on the GPU or in RAM
    for role in (LOOKUP, HEAD):
        for i, layer in enumerate(layers):
            for t, (size, r) in enumerate(layer):
                if r != role:
                    continue
                if role == LOOKUP:
                    tier = slowest
                elif on_gpu + size <= gpu_share * (1 + eps):
                    tier = Tier.GPU
                elif in_memory + size <= memory_share * (1 + eps):
                    tier = Tier.CPU
                else:
                    tier = Tier.DISK
                out[i][t] = tier
                on_gpu += size if tier == Tier.GPU else 0
                in_memory += size if tier != Tier.DISK else 0
    decoder = [[size for size, r in layer if r == LAYER] for layer in layers]
    decoder_total = float(sum(map(sum, decoder)))
    if decoder_total:
        gpu_left = max(0.0, gpu_share - on_gpu)
        cpu_left = max(0.0, memory_share - gpu_share - (in_memory - on_gpu))
        split = split_layers(decoder, min(100.0, 100 * gpu_left / decoder_total),
                             min(100.0, 100 * cpu_left / decoder_total))
        for i, layer in enumerate(layers):
            tiers = iter(split[i])
            out[i] = [next(tiers) if r == LAYER else tier for (_, r), tier in zip(layer, out[i])]
    return out  # type: ignore[return-value]


def slot_tier(layer: int, micro_batch: int, num_layers: int, num_micro_batches: int,
              gpu_percent: float, cpu_percent: float) -> Tier:
    """Tier of the (layer, micro-batch) slot of the activations (the KV cache: cache_pair_split)."""
    index = layer * num_micro_batches + micro_batch
    return tier_by_midpoint(index, 1, num_layers * num_micro_batches, gpu_percent, cpu_percent)


def cache_pair_split(pairs: int, gpu_percent: float, cpu_percent: float) -> tuple[int, int, int]:
    """(GPU, RAM, disk) counts of a cache slot's (row, head) pairs: every slot is split the same way,
    rounded down on the GPU and in RAM like the weights (the planner budgets exactly the percents)."""
    eps = 1e-6
    gpu = min(pairs, math.floor(pairs * gpu_percent / 100 + eps))
    ram = min(pairs, math.floor(pairs * (gpu_percent + cpu_percent) / 100 + eps))
    return gpu, ram - gpu, pairs - ram
