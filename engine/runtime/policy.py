"""The placement policy (FlexGen's search space) and its validation, in one place.

Percents say where each kind of tensor lives: the share on the GPU, the share on the CPU, and the
rest on disk. On a host without CUDA the compute device is the CPU, so the "GPU" share is folded
into CPU memory (it is RAM all the same) and counts against the CPU budget; the disk share is real.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.errors import PolicyError



@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    num_bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if not 2 <= self.num_bits <= 8:
            raise PolicyError(f"compression bits must be 2..8, got {self.num_bits}")
        if self.group_size < 2:
            raise PolicyError(f"compression group size must be >= 2, got {self.group_size}")


@dataclass(frozen=True, kw_only=True)
class Policy:
    gpu_batch_size: int = 8
    num_gpu_batches: int = 1
    weights_gpu_percent: float = 100.0
    weights_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    activations_gpu_percent: float = 100.0
    activations_cpu_percent: float = 0.0
    overlap: bool = True
    cpu_cache_compute: bool = False
    compress_weight: bool = False
    compress_cache: bool = False
    compression: CompressionConfig = CompressionConfig()

    def __post_init__(self) -> None:
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise PolicyError(f"gpu_batch_size and num_gpu_batches must be >= 1, got "
                              f"{self.gpu_batch_size} and {self.num_gpu_batches}")
        for kind in ("weights", "cache", "activations"):
            gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            if not (0 <= gpu <= 100 and 0 <= cpu <= 100):
                raise PolicyError(f"{kind} percents must be within 0..100, got GPU {gpu} and CPU {cpu}")
            if gpu + cpu > 100 + 1e-9:
                raise PolicyError(f"{kind} percents sum to {gpu + cpu:g} (GPU {gpu:g} + CPU {cpu:g}); "
                                  f"at most 100 (the rest goes to disk)")

    @property
    def block_size(self) -> int:
        """Rows per block: every micro-batch of a block shares each layer's weight load."""
        return self.gpu_batch_size * self.num_gpu_batches

    def disk_percent(self, kind: str) -> float:
        return max(0.0, 100.0 - getattr(self, f"{kind}_gpu_percent") - getattr(self, f"{kind}_cpu_percent"))

    @property
    def percents(self) -> tuple[float, float, float, float, float, float]:
        return (self.weights_gpu_percent, self.weights_cpu_percent, self.cache_gpu_percent,
                self.cache_cpu_percent, self.activations_gpu_percent, self.activations_cpu_percent)

    @classmethod
    def from_percents(cls, percents, **kwargs) -> "Policy":
        """Build from FlexGen's six percents: weights, cache, activations (GPU, CPU) each."""
        percents = list(percents)
        if len(percents) != 6:
            raise PolicyError(f"percents take 6 numbers (weights GPU CPU, cache GPU CPU, "
                              f"activations GPU CPU), got {len(percents)}", parameter="percents")
        names = ("weights_gpu_percent", "weights_cpu_percent", "cache_gpu_percent",
                 "cache_cpu_percent", "activations_gpu_percent", "activations_cpu_percent")
        return cls(**dict(zip(names, (float(p) for p in percents))), **kwargs)

    def replace(self, **changes) -> "Policy":
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        pct = " ".join(f"{p:g}" for p in self.percents)
        flags = [f for f, on in (("overlap", self.overlap), ("cw", self.compress_weight),
                                 ("cc", self.compress_cache), ("cpu-attn", self.cpu_cache_compute)) if on]
        return f"{self.gpu_batch_size}x{self.num_gpu_batches} [{pct}] {','.join(flags)}".rstrip()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Policy":
        data = dict(data)
        comp = data.pop("compression", None)
        if comp is not None:
            data["compression"] = CompressionConfig(**comp)
        return cls(**data)
