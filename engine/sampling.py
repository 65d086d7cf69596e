"""Next-token choice: greedy, temperature and top-p, with randomness that is a pure function of
(seed, row id, position) — so a row's output is the same alone, in any batch, at any place in the
batch, and after a crash and resume.
"""
from __future__ import annotations

import torch

from engine.rows import GenerationParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_for(seed: int, row_id: int, position: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, row_id, position)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (row_id & _MASK64)) ^ (position & _MASK64))
    return (x >> 11) / float(1 << 53)


def choose_tokens(logits: torch.Tensor, params: GenerationParams, row_ids: list[int],
                  positions: list[int]) -> list[int]:
    """logits: [B, vocab] float32; positions: index of the token being generated, per row."""
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    # Sort descending with a stable order so ties resolve the same way in every batch.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = (cumulative - sorted_probs) < params.top_p
        sorted_probs = sorted_probs * keep
        cumulative = torch.cumsum(sorted_probs, dim=-1)
    u = torch.tensor([uniform_for(params.seed, r, p) for r, p in zip(row_ids, positions)],
                     dtype=cumulative.dtype, device=cumulative.device)
    # Inverse CDF: the first token whose cumulative mass exceeds u * total mass.
    index = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None], right=True).squeeze(1)
    index = index.clamp_max(cumulative.shape[-1] - 1)
    return sorted_ids.gather(1, index[:, None]).squeeze(1).tolist()
