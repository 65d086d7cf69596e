"""Attention against itself: a query's output does not depend on how many keys its neighbours
make the call read, nor on which group of queries it came in (prefill vs decode), and it is the
plain causal softmax attention of float64 to rounding. Both implementations: the native kernel
(engine.model.native_attention, what a CPU runs where a C compiler is) and the library's batched
products (attention.attend_aligned_library, what a GPU runs)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from engine.model import native_attention, native_build
from engine.model.kernel_shapes import key_capacity
from engine.model.attention import attend_aligned_library

D = 64
IMPLEMENTATIONS = ["native", "library"]


def cache(positions: int, pairs: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(pairs, positions, D, generator=gen).to(dtype) * D ** -0.5
    k, v = (torch.randn(positions, pairs, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def attend(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """q [n, S, D] at the last S of T positions over a left-padded cache k, v [T, n, D] whose pair p
    starts at first[p]: aligned here (pair p's first real key at index 0, zeros past its last), then
    attended by one implementation."""
    T, n, _ = k.shape
    kh, vh = (torch.zeros(n, key_capacity(T), D, dtype=k.dtype) for _ in range(2))
    for p in range(n):
        kh[p, :T - first[p]], vh[p, :T - first[p]] = k[first[p]:, p], v[first[p]:, p]
    last_key = (torch.arange(T - q.shape[1], T)[None, :] - first[:, None]).clamp(min=0)
    if impl == "native":
        if not native_attention.available():
            pytest.skip("the native attention kernel is not built here (no C compiler)")
        return native_attention.attend_aligned(q, kh, vh, last_key)
    return attend_aligned_library(q, kh, vh, last_key)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, pos: int) -> torch.Tensor:
    """One pair's query at `pos` over its keys first .. pos, in float64."""
    keys, values = k[first:pos + 1].double(), v[first:pos + 1].double()
    return torch.softmax(q.double() @ keys.T, dim=-1) @ values


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_query_is_the_same_whatever_its_neighbours_lengths(impl, dtype):
    # Pair 0's row has 300 positions (its first real one at 100 in a left-padded cache of 400);
    # alone, its query at the last position reads 320 aligned keys; beside a row of 400 positions
    # the call reads 448 (from 64 on, per pair). Long keys are where a library's reduction blocks
    # over the key axis change with its length.
    q, k, v = cache(400, 64, dtype, seed=1)
    last = q[:, -1:]
    beside_long = attend(impl, last, k, v, torch.tensor([100] + [0] * 63))
    alone = attend(impl, last[:1], k[100:, :1], v[100:, :1], torch.tensor([0]))
    assert torch.equal(beside_long[:1], alone)
    want = reference(q[0, -1], k[:, 0], v[:, 0], 100, 399).to(dtype)
    torch.testing.assert_close(alone[0, 0], want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_gives_every_position_what_a_decode_step_there_gives(impl, dtype):
    # A 330-position prefill over 32 pairs with different left padding, against decode steps at
    # positions inside each group of queries and past 128 keys.
    q, k, v = cache(330, 32, dtype, seed=2)
    first = torch.arange(32) % 5
    prefill = attend(impl, q, k, v, first)
    for pos in (5, 63, 64, 127, 128, 150, 191, 192, 255, 256, 300, 329):
        step = attend(impl, q[:, pos:pos + 1], k[:pos + 1], v[:pos + 1], first)
        assert torch.equal(prefill[:, pos:pos + 1], step), f"position {pos}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_two_implementations_agree_to_rounding_and_match_float64(dtype):
    q, k, v = cache(200, 48, dtype, seed=3)
    first = torch.arange(48) % 7 * 9  # pairs whose padding covers some queries: those see their first key
    native, library = attend("native", q, k, v, first), attend("library", q, k, v, first)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(native, library, **tolerance)
    for p, pos in ((0, 0), (5, 199), (13, 40), (47, 150)):
        start = int(first[p])  # a padding query (pos < start) sees its row's first real key only
        want = reference(q[p, pos], k[:, p], v[:, p], start, max(pos, start))
        torch.testing.assert_close(native[p, pos].double(), want, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [150, 1])
def test_a_cache_read_from_disk_is_attended_in_place_as_one_held_in_memory_is(dtype, queries):
    # The disk's position-major layout [T, 2, n, D] (keys and values interleaved per position) and
    # memory's aligned one give every query the same bits: a cache moved between tiers by a new
    # placement, or split across them, attends alike. One query per pair (a decode step) is read
    # in tiles of pairs, many one pair at a time: the same sums either way.
    if not native_attention.available():
        pytest.skip("the native attention kernel is not built here (no C compiler)")
    q, k, v = cache(150, 24, dtype, seed=4)
    q = q[:, 150 - queries:]
    first = torch.arange(24) % 6 * 11
    as_read = torch.stack((k, v), dim=1)  # [T, 2, n, D]
    last_key = (torch.arange(150 - queries, 150)[None, :] - first[:, None]).clamp(min=0)
    in_place = native_attention.attend_position_major(q, as_read[:, 0], as_read[:, 1], first, last_key)
    assert torch.equal(in_place, attend("native", q, k, v, first))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_step_key_span_made_once_attends_as_indices_made_per_call(dtype):
    """Every layer of a step reuses its micro-batch's KeySpan (made on the first call): attention
    over a position-major read and over the aligned layout gives the bits it gives with indices
    made per call, the span's bounds are the call's, and a span past the cache is refused."""
    from engine.model.attention import attend as attend_cache, attend_aligned
    from engine.model.key_span import key_span
    q, k, v = cache(150, 24, dtype, seed=5)
    q = q[:, -1:]
    first = torch.arange(24) % 6 * 11
    query_pos = torch.tensor([149])
    span = key_span(first, query_pos)
    assert span.key_count == 150 - int(first.min()) and span.last_position == 149
    as_read = torch.stack((k, v), dim=1)
    for _ in range(2):  # the second call reuses the span's offsets
        assert torch.equal(attend_cache(q, as_read[:, 0], as_read[:, 1], span=span),
                           attend_cache(q, as_read[:, 0], as_read[:, 1], first, query_pos))
    kh, vh = (torch.zeros(24, key_capacity(150), D, dtype=dtype) for _ in range(2))
    for p in range(24):
        kh[p, :150 - first[p]], vh[p, :150 - first[p]] = k[first[p]:, p], v[first[p]:, p]
    assert torch.equal(attend_aligned(q, kh, vh, span=span), attend_aligned(q, kh, vh, first, query_pos))
    if native_attention.available():
        with pytest.raises(ValueError, match="positions"):
            native_attention.attend_position_major(q, as_read[:149, 0], as_read[:149, 1], first, span)


def test_a_micro_batch_makes_each_step_key_span_once():
    from engine.model.families import family_math
    from engine.model.config import preset
    from engine.runtime.micro_batch import BlockRow, MicroBatch
    from engine.runtime.rows import RowResult
    rows = [BlockRow(RowResult(row_id=i, generated_ids=[]), list(range(1, 4 + i)), 4, 3 + i) for i in range(3)]
    mb = MicroBatch(rows, prompt_len=5, max_len=9, pad_id=0, kv_heads=2, layers=family_math(preset("125m")),
                    device=torch.device("cpu"))
    mb.begin_step(5)
    cpu = torch.device("cpu")
    span = mb.key_span(slice(0, 6), 5, cpu)
    assert mb.key_span(slice(0, 6), 5, cpu) is span and mb.key_span(slice(2, 6), 5, cpu) is not span
    assert torch.equal(span.last_key, (torch.arange(5)[None, :] - mb.first[:, None]).clamp(min=0))
    mb.begin_step(1)
    step = mb.key_span(slice(0, 6), 1, cpu)
    assert step is not span and torch.equal(step.last_key, (5 - mb.first)[:, None])


@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
def test_bfloat16_on_avx512_bf16_gives_every_position_its_decode_bits_at_every_head_dim(head_dim):
    # The AVX512-BF16 kernel weighs values for up to 4 queries per pass in a prefill and for one in
    # a decode step, with an instance per head_dim: each must give a query its decode step's bits.
    if native_attention.bf16_kernel() != "avx512-bf16":
        pytest.skip("this CPU has no AVX512-BF16: bfloat16 attention runs on the generic native kernel")
    gen = torch.Generator().manual_seed(head_dim)
    n, T = 6, 70
    q = (torch.randn(n, T, head_dim, generator=gen) * head_dim ** -0.5).bfloat16()
    kh, vh = (torch.randn(n, key_capacity(T), head_dim, generator=gen).bfloat16() for _ in range(2))
    first = torch.tensor([0, 3, 0, 17, 5, 0])
    last_key = (torch.arange(T)[None, :] - first[:, None]).clamp(min=0)
    prefill = native_attention.attend_aligned(q, kh, vh, last_key)
    for pos in (0, 1, 2, 3, 4, 15, 16, 17, 40, 69):
        step = native_attention.attend_aligned(q[:, pos:pos + 1], kh, vh, last_key[:, pos:pos + 1])
        assert torch.equal(prefill[:, pos:pos + 1], step), f"position {pos}"
    for p in range(n):
        keys = int(last_key[p, -1]) + 1
        want = torch.softmax(q[p, -1].double() @ kh[p, :keys].double().T, dim=-1) @ vh[p, :keys].double()
        torch.testing.assert_close(prefill[p, -1].double(), want, rtol=2e-2, atol=2e-2)


def test_the_kernel_is_built_wherever_a_c_compiler_is():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine: attention runs on the library path")
    assert native_attention.available()
    flags = native_build.cpu_flags().split()
    with_avx512_bf16 = all(flag in flags for flag in native_attention.BF16_CPU_FLAGS)
    assert native_attention.bf16_kernel() == ("avx512-bf16" if with_avx512_bf16 else "generic")


def test_the_switch_turns_the_kernel_off():
    code = "from engine.model import native_attention; print(native_attention.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, native_attention.ENV_SWITCH: "0"}).stdout
    assert out.strip() == "False"
