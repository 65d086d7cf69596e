"""kernels.attend against itself: a query's output does not depend on how many keys its neighbours
make the call read, nor on which group of queries it came in (prefill vs decode), and it is the
plain causal softmax attention of float64 to rounding."""
from __future__ import annotations

import pytest
import torch

from engine.model.kernels import attend

D = 64


def cache(positions: int, pairs: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(pairs, positions, D, generator=gen).to(dtype) * D ** -0.5
    k, v = (torch.randn(positions, pairs, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, pos: int) -> torch.Tensor:
    """One pair's query at `pos` over its keys first .. pos, in float64."""
    keys, values = k[first:pos + 1].double(), v[first:pos + 1].double()
    return torch.softmax(q.double() @ keys.T, dim=-1) @ values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_query_is_the_same_whatever_its_neighbours_lengths(dtype):
    # Pair 0's row has 300 positions (its first real one at 100 in a left-padded cache of 400);
    # alone, its query at the last position reads 320 aligned keys; beside a row of 400 positions
    # the call reads 448 (from 64 on, per pair). Long keys are where a library's reduction blocks
    # over the key axis change with its length.
    q, k, v = cache(400, 64, dtype, seed=1)
    last = q[:, -1:]
    beside_long = attend(last, k, v, torch.tensor([100] + [0] * 63))
    alone = attend(last[:1], k[:, :1], v[:, :1], torch.tensor([100]))
    assert torch.equal(beside_long[:1], alone)
    want = reference(q[0, -1], k[:, 0], v[:, 0], 100, 399).to(dtype)
    torch.testing.assert_close(alone[0, 0], want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_gives_every_position_what_a_decode_step_there_gives(dtype):
    # A 330-position prefill over 32 pairs with different left padding, against decode steps at
    # positions inside each group of queries and past 128 keys.
    q, k, v = cache(330, 32, dtype, seed=2)
    first = torch.arange(32) % 5
    prefill = attend(q, k, v, first)
    for pos in (5, 63, 64, 127, 128, 150, 191, 192, 255, 256, 300, 329):
        step = attend(q[:, pos:pos + 1], k[:pos + 1], v[:pos + 1], first)
        assert torch.equal(prefill[:, pos:pos + 1], step), f"position {pos}"
