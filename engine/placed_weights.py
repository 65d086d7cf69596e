"""The model's weights placed on tiers by a Policy, and the per-layer load the schedule calls.

Resident tensors (GPU/CPU tiers) are read once and kept in the compute dtype; disk tensors are
read every time their layer runs (with O_DIRECT), converted, and dropped after use. `replace`
re-places the model for a new policy, moving only the tensors whose tier changes.
"""
from __future__ import annotations

import torch

from engine.model_config import OPTConfig
from engine.placement import split_tensors
from engine.policy import Policy
from engine.tiers import DiskTier, Tier, TransferStats, aligned_empty, to_device, CPU_TO_GPU
from engine.weights import TensorEntry, WeightStore, align_up, layer_names


class PlacedWeights:
    def __init__(self, store: WeightStore, cfg: OPTConfig, policy: Policy, device: torch.device,
                 dtype: torch.dtype, disk: DiskTier, stats: TransferStats) -> None:
        self.store, self.cfg, self.device, self.dtype = store, cfg, device, dtype
        self.disk, self.stats = disk, stats
        self.tiers: dict[str, dict[str, Tier]] = {}
        self.resident: dict[str, dict[str, torch.Tensor]] = {}
        self.replace(policy)

    @staticmethod
    def plan_tiers(store: WeightStore, cfg: OPTConfig, policy: Policy) -> dict[str, dict[str, Tier]]:
        out = {}
        for layer in layer_names(cfg):
            entries = store.layers[layer]
            tiers = split_tensors([e.nbytes for e in entries], policy.weights_gpu_percent,
                                  policy.weights_cpu_percent)
            out[layer] = {e.name: t for e, t in zip(entries, tiers)}
        return out

    def replace(self, policy: Policy) -> int:
        """Place for `policy`; returns the bytes whose tier changed."""
        new_tiers = self.plan_tiers(self.store, self.cfg, policy)
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
                elif old in (Tier.GPU, Tier.CPU):
                    resident[entry.name] = self._place(resident[entry.name], new)
                else:
                    resident[entry.name] = self._place(self._read(layer, entry), new)
        self.tiers = new_tiers
        return moved

    def _place(self, t: torch.Tensor, tier: Tier) -> torch.Tensor:
        if tier == Tier.GPU:
            return t.to(self.device)
        t = t.to("cpu")
        return t.pin_memory() if self.device.type == "cuda" else t

    def _read(self, layer: str, entry: TensorEntry) -> torch.Tensor:
        """Read one tensor from the store into CPU memory in the compute dtype."""
        buf = aligned_empty(align_up(entry.nbytes))
        self.disk.read_into(self.store.path(layer), entry.offset, buf)
        fp16 = buf[: entry.nbytes].view(torch.float16).view(entry.shape)
        return fp16.to(self.dtype) if self.dtype != torch.float16 else fp16.clone()

    def load(self, layer: str) -> dict[str, torch.Tensor]:
        """All tensors of `layer` on the compute device, ready for the math (runs on the I/O thread)."""
        out = {}
        for entry in self.store.layers[layer]:
            tier = self.tiers[layer][entry.name]
            t = self.resident[layer][entry.name] if tier != Tier.DISK else self._read(layer, entry)
            out[entry.name] = to_device(t, self.device, self.stats, CPU_TO_GPU)
        return out

    def bytes_by_tier(self) -> dict[Tier, int]:
        """Bytes of weights per tier, in the compute dtype (what each tier holds)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        totals = {t: 0 for t in Tier}
        for layer, tiers in self.tiers.items():
            for entry in self.store.layers[layer]:
                totals[tiers[entry.name]] += entry.nbytes // 2 * size
        return totals

    def max_streamed_layer_bytes(self) -> int:
        """The largest per-layer disk read, in the compute dtype (the streaming buffer's size)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return max((sum(e.nbytes // 2 * size for e in self.store.layers[layer] if tiers[e.name] == Tier.DISK)
                    for layer, tiers in self.tiers.items()), default=0)
