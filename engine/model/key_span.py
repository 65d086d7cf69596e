"""Which cached keys each query of an attention call reads, worked out once per step.

A (micro-batch, cache part) has the same pairs, the same padding and the same query positions in
every layer of a step, so the indices attention needs (each query's last key, how many keys the call
reads, the furthest position it reads, each pair's offset into a buffer) are made once a step and
reused by every layer, instead of a dozen small tensor operations per layer and call (over capacity,
16 micro-batches x 24 layers of them a decode step).

Shapes: n (row, head) pairs, S queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class KeySpan:
    first: torch.Tensor     # [n] int64, each pair's first real position (left padding before it)
    last_key: torch.Tensor  # [n, S] int64, contiguous: the last aligned key (counted from first) each query reads
    key_count: int          # the most keys any query reads: max(last_key) + 1
    last_position: int      # the furthest cache position any query reads: max(first + last_key)
    _offsets: dict = field(default_factory=dict, compare=False, repr=False)

    def offsets(self, position_stride: int, pair_stride: int) -> torch.Tensor:
        """[n] int64 element offsets of each pair's first real key in a buffer with these strides
        (position-major: both; aligned: position_stride 0), on the CPU, made once per strides."""
        key = (position_stride, pair_stride)
        if key not in self._offsets:
            first = self.first.cpu()
            self._offsets[key] = first * position_stride + torch.arange(first.shape[0], dtype=torch.int64) * pair_stride
        return self._offsets[key]

    def to(self, device: torch.device) -> KeySpan:
        if self.last_key.device == device:
            return self
        return KeySpan(self.first.to(device), self.last_key.to(device), self.key_count, self.last_position)


def key_span(first: torch.Tensor, query_pos: torch.Tensor) -> KeySpan:
    """first [n]; query_pos [S], each query's cache position (the same for every pair). A query
    attends its pair's positions first .. its own; a padding query (before its row's first real
    position) reads that first key only."""
    first = first.to(torch.int64)
    last_key = (query_pos.to(first.device)[None, :] - first[:, None]).clamp_(min=0).contiguous()
    if last_key.numel() == 0:
        return KeySpan(first, last_key, 0, -1)
    return KeySpan(first, last_key, int(last_key.max()) + 1, int((last_key + first[:, None]).max()))
