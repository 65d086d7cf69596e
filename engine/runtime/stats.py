"""Measured figures of a run: throughput per block, bytes moved per link, memory peaks."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class BlockRecord:
    rows: int
    prompt_tokens: int
    generated_tokens: int  # tokens generated in this block by this run
    prefill_s: float
    total_s: float
    transfers: dict[str, tuple[int, float]]  # link -> (bytes, busy seconds)
    peak_rss_bytes: int
    peak_gpu_bytes: int
    throttled: bool = False  # a link was capped (the test knob): its figures are not this host's


@dataclass
class EngineStats:
    blocks: list[BlockRecord] = field(default_factory=list)

    def record_block(self, *, rows: int, prompt_tokens: int, generated_tokens: int, prefill_s: float,
                     total_s: float, transfers: dict, peak_rss: int, device: torch.device,
                     throttled: bool = False) -> BlockRecord:
        peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        record = BlockRecord(rows, prompt_tokens, generated_tokens, prefill_s, total_s, transfers, peak_rss, peak_gpu,
                             throttled)
        self.blocks.append(record)
        return record

    @property
    def generated_tokens(self) -> int:
        return sum(b.generated_tokens for b in self.blocks)

    @property
    def total_s(self) -> float:
        return sum(b.total_s for b in self.blocks)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the whole run, prefill included (FlexGen's metric)."""
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        s = sum(b.prefill_s for b in self.blocks)
        return sum(b.prompt_tokens for b in self.blocks) / s if s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        s = sum(b.total_s - b.prefill_s for b in self.blocks)
        tokens = sum(max(b.generated_tokens - b.rows, 0) for b in self.blocks)
        return tokens / s if s else 0.0

    @property
    def peak_rss_bytes(self) -> int:
        return max((b.peak_rss_bytes for b in self.blocks), default=0)

    @property
    def peak_gpu_bytes(self) -> int:
        return max((b.peak_gpu_bytes for b in self.blocks), default=0)
