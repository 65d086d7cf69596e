"""Which tier holds each tensor, from a Policy's percents.

Weights: within every layer, tensors are laid out in store order and each goes to the tier that
holds the middle of its byte range (FlexGen's rule), so a 50 % disk policy streams about half of
every layer and the streaming overlaps each layer's compute. A layer has only a few big tensors
(OPT: attention, fc1, fc2 a third each), so one layer alone can only be split in thirds; FlexGen
then puts 67 % in RAM when asked for 50 or 60 %, and the planner's fractions would be off by up to
a sixth of the model. `split_layers` carries each layer's rounding error into the next layer's
split (error diffusion): every layer stays within one tensor of the asked split, and the whole
model within half a tensor of it. KV cache and activations are split by
slot: one slot per (layer, micro-batch), numbered layer-major, placed by the same midpoint rule, so
mixed GPU/CPU/disk placements of cache and activations (which FlexGen refuses) are just other splits.
On a host without CUDA the GPU tier is the same RAM as the CPU tier.
"""
from __future__ import annotations

from engine.tiers import Tier


def tier_by_midpoint(start: float, size: float, total: float, gpu_percent: float, cpu_percent: float) -> Tier:
    mid = (start + size / 2) / total * 100.0 if total else 0.0
    if mid < gpu_percent:
        return Tier.GPU
    if mid < gpu_percent + cpu_percent:
        return Tier.CPU
    return Tier.DISK


def split_tensors(sizes: list[int], gpu_percent: float, cpu_percent: float) -> list[Tier]:
    """One tier per tensor of a layer, by the midpoint of its bytes."""
    total, start, tiers = float(sum(sizes)), 0.0, []
    for size in sizes:
        tiers.append(tier_by_midpoint(start, size, total, gpu_percent, cpu_percent))
        start += size
    return tiers


def split_layers(layers: list[list[int]], gpu_percent: float, cpu_percent: float) -> list[list[Tier]]:
    """One tier per tensor of every layer (tensor byte sizes, in order), the model's total split as
    close to the percents as tensor sizes allow."""
    out: list[list[Tier]] = []
    seen = on_gpu = on_gpu_or_cpu = 0.0  # bytes so far: all, placed on GPU, placed on GPU or CPU
    for sizes in layers:
        total = float(sum(sizes))
        seen += total
        if not total:
            out.append(split_tensors(sizes, gpu_percent, cpu_percent))
            continue
        # Percents of this layer that bring the running totals back to the asked fractions.
        gpu_here = min(100.0, max(0.0, (seen * gpu_percent / 100 - on_gpu) / total * 100))
        upto_cpu = min(100.0, max(gpu_here, (seen * (gpu_percent + cpu_percent) / 100 - on_gpu_or_cpu)
                                  / total * 100))
        tiers = split_tensors(sizes, gpu_here, upto_cpu - gpu_here)
        on_gpu += sum(s for s, t in zip(sizes, tiers) if t == Tier.GPU)
        on_gpu_or_cpu += sum(s for s, t in zip(sizes, tiers) if t != Tier.DISK)
        out.append(tiers)
    return out


def slot_tier(layer: int, micro_batch: int, num_layers: int, num_micro_batches: int,
              gpu_percent: float, cpu_percent: float) -> Tier:
    """Tier of the (layer, micro-batch) slot of the KV cache or of the activations."""
    index = layer * num_micro_batches + micro_batch
    return tier_by_midpoint(index, 1, num_layers * num_micro_batches, gpu_percent, cpu_percent)
