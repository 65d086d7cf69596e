"""Shrinking a published size for tests (`flexjob make-model --hidden`): the heads it gets."""
from __future__ import annotations

from engine.errors import ModelConfigError


def heads_for_hidden(hidden_size: int, num_heads: int | None) -> int:
    """`num_heads`, or 64-wide heads (at least one); refused when they do not divide the hidden size."""
    heads = num_heads or max(1, hidden_size // 64)
    if hidden_size % heads:
        raise ModelConfigError(f"hidden size {hidden_size} is not divisible by {heads} heads",
                               parameter="hidden_size")
    return heads
