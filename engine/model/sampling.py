"""Next-token choice: greedy, temperature and top-p, with randomness that is a pure function of
(seed, row id, position) — so a row's output is the same alone, in any batch, at any place in the
batch, and after a crash and resume.
"""
from __future__ import annotations

import torch

from engine.runtime.rows import GenerationParams

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_generator(seed: int, row_id: int, position: int) -> torch.Generator:
    """A generator whose stream depends only on (seed, row_id, position)."""
    x = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ (row_id & _MASK64)) ^ (position & _MASK64))
    return torch.Generator().manual_seed(x >> 1)


def choose_tokens(logits: torch.Tensor, params: GenerationParams, row_ids: list[int],
                  positions: list[int]) -> list[int]:
    """logits: [B, vocab] float32; positions: index of the token being generated, per row.

    Sampling is Gumbel-max: argmax(logits / T + Gumbel noise) draws from softmax(logits / T). Unlike
    an inverse CDF over 50k cumulative sums, it flips only when two perturbed scores are within
    float noise of each other, so batch-size-dependent rounding in the logits almost never changes
    a sampled token.
    """
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    scores = logits.float().cpu() / params.temperature
    if params.top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        scores = scores.scatter(1, sorted_ids, scores.gather(1, sorted_ids).masked_fill(outside, float("-inf")))
    # Each row's noise is computed on its own: `log` is vectorised in a loop whose scalar tail and
    # thread split depend on the tensor's size, so a [B, vocab] call could round a row's values
    # differently depending on B.
    return [int((row + _gumbel(scores.shape[1], params.seed, r, p)).argmax())
            for row, r, p in zip(scores, row_ids, positions)]


def _gumbel(vocab: int, seed: int, row_id: int, position: int) -> torch.Tensor:
    noise = torch.rand(vocab, generator=row_generator(seed, row_id, position))
    return -torch.log(-torch.log(noise.clamp_(1e-10, 1 - 1e-7)))
