"""Which tier holds each tensor, from a Policy's percents.

Weights: within every layer, tensors are laid out in store order and each goes to the tier that
holds the middle of its byte range (FlexGen's rule), so a 50 % disk policy streams about half of
every layer and the streaming overlaps each layer's compute. KV cache and activations are split by
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


def slot_tier(layer: int, micro_batch: int, num_layers: int, num_micro_batches: int,
              gpu_percent: float, cpu_percent: float) -> Tier:
    """Tier of the (layer, micro-batch) slot of the KV cache or of the activations."""
    index = layer * num_micro_batches + micro_batch
    return tier_by_midpoint(index, 1, num_layers * num_micro_batches, gpu_percent, cpu_percent)
