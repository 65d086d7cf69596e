"""Which tier each stored weight tensor of a model takes under a policy, and the bytes it takes
there: shared by the placed weights (which put them there) and the budget check (which sizes them
before anything is loaded)."""
from __future__ import annotations

import torch

from engine.model.checkpoint import TensorEntry, WeightStore, layer_names
from engine.model.config import ModelConfig
from engine.model.four_bit import four_bit_kernel
from engine.runtime.placement import HEAD, LAYER, LOOKUP, split_weights
from engine.runtime.policy import Policy
from engine.runtime.tiers import Tier

ROW_LOOKUP_TABLES = ("embed_tokens.weight", "embed_positions.weight")


def role(layer: str, name: str) -> str:
    """What placement does with a tensor (engine.runtime.placement.split_weights)."""
    if layer.startswith("decoder."):
        return LAYER
    return LOOKUP if name in ROW_LOOKUP_TABLES else HEAD


def held_element_size(entry: TensorEntry, element_size: int) -> int:
    """Lookup tables are held in fp16 (the embedding converts the rows it gathers); the rest in the
    compute dtype."""
    return 2 if entry.name in ROW_LOOKUP_TABLES else element_size


def tier_bytes(entry: TensorEntry, tier: Tier, element_size: int) -> int:
    """Bytes `entry` takes on `tier`: as stored on disk; held (compute dtype, or packed) in memory."""
    return entry.nbytes if tier == Tier.DISK else entry.held_bytes(held_element_size(entry, element_size))


def plan_weight_tiers(store: WeightStore, cfg: ModelConfig, policy: Policy) -> dict[str, dict[str, Tier]]:
    """{layer: {tensor name: tier}} for every tensor of the store."""
    names = layer_names(cfg)
    split = split_weights([[(e.nbytes, role(layer, e.name)) for e in store.layers[layer]] for layer in names],
                          policy.weights_gpu_percent, policy.weights_cpu_percent)
    return {layer: {e.name: t for e, t in zip(store.layers[layer], tiers)}
            for layer, tiers in zip(names, split)}


def bytes_by_tier(store: WeightStore, tiers: dict[str, dict[str, Tier]], element_size: int) -> dict[Tier, int]:
    """Bytes of weights each tier holds under `tiers`."""
    totals = {t: 0 for t in Tier}
    for layer, layer_tiers in tiers.items():
        for entry in store.layers[layer]:
            totals[layer_tiers[entry.name]] += tier_bytes(entry, layer_tiers[entry.name], element_size)
    return totals


def streams_converted_copies(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether uncompressed tensors streamed from the disk tier are read from copies converted once
    to `dtype` (engine.runtime.converted_files): on a CPU, in a two-byte dtype other than the store's."""
    return device.type == "cpu" and dtype == torch.bfloat16


def read_in_place(entry: TensorEntry, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `entry`, streamed from the disk tier, is used as it lies in its read buffer: a 4-bit
    matrix that a kernel multiplies as stored, or a converted copy (a buffer kept per layer parity)."""
    if entry.name in ROW_LOOKUP_TABLES:
        return False
    if entry.compressed:
        return kernel_of(entry, dtype, device) is not None
    return streams_converted_copies(dtype, device)


def kernel_of(entry: TensorEntry, dtype: torch.dtype, device: torch.device):
    """The 4-bit kernel that multiplies `entry` without a per-step dequantised copy, or None."""
    if not entry.compressed or entry.name in ROW_LOOKUP_TABLES:
        return None
    return four_bit_kernel(entry.shape, entry.num_bits, entry.group_size, dtype, device)
