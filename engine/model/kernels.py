"""Batch-invariant kernels: a row's numbers do not depend on its neighbours or on prefill vs decode.

A BLAS picks its blocking, its K-split and its micro-kernel by the shape of the call: on a CPU the
same row multiplied by the same weights gives different low bits when 1, 8 or 600 rows share the
call (MKL's fp32 gemv for one row; oneDNN's bf16 kernels differ for 33..256 rows on AMX). Greedy
decoding turns such a bit into a different token wherever two logits are close. The way out
(He et al., "Defeating Nondeterminism in LLM Inference", 2025) is to give every reduction one
fixed order: here, by calling the library only with shapes that never vary.

- `linear`: rows go to the library in chunks of fixed sizes (the last chunk zero-padded): the
  reference size `rows_per_call(dtype)`, and the other sizes of `chunk_sizes(dtype)` only where a
  one-off check on random rows finds that the library gives every row bit for bit the reference's
  numbers at that size (oneDNN's bf16 kernels on AVX512-BF16 do for 2..4096 rows). So a decode
  step of 32 rows is one 32-row call, a prefill of 4096 rows one 4096-row call, and every row of every
  call, prefill or decode, gets the reference's numbers.
- `attend`: each (row, head) pair's keys are aligned so that the row's first real position sits
  at index 0 (the cache is left-padded per block, so a row's index would otherwise depend on its
  neighbours' prompt lengths); queries go to `bmm` in groups of exactly `QUERIES_PER_CALL`; the key
  axis is padded with masked positions to a multiple of `KEY_ALIGN`. Masked keys add exact zeros
  to every sum, and the same positions always fall in the same SIMD lanes, so a decode step
  computes a position's attention bit for bit as the prefill of the same prompt does.

Shapes: n (row, head) pairs, S queries, T cached positions, D head_dim.
"""
from __future__ import annotations

import torch

from engine.model import int4_matmul
from engine.model.kernel_shapes import KEY_ALIGN, QUERIES_PER_CALL, chunk_plan, rows_per_call


def linear(x: torch.Tensor, weight: torch.Tensor | int4_matmul.Int4Weight,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose rows do not depend on how many rows share the call. x: [..., K] -> [..., N].
    A 4-bit weight in the fused kernel's layout runs on that kernel (engine.model.int4_matmul)."""
    if isinstance(weight, int4_matmul.Int4Weight):
        return int4_matmul.linear(x, weight, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    m, dtype_name = rows.shape[0], str(x.dtype).removeprefix("torch.")
    plan = chunk_plan(m, dtype_name, lambda size: _agrees(size, rows_per_call(dtype_name), weight, bias))
    padded = sum(plan)
    if padded != m:
        rows = torch.cat((rows, rows.new_zeros(padded - m, k)))
    out = torch.empty(padded, weight.shape[0], dtype=x.dtype, device=x.device)
    start = 0
    for size in plan:
        _call(rows[start:start + size], weight, bias, out[start:start + size])
        start += size
    return out[:m].view(*lead, weight.shape[0])


def _call(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, into: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.mm(rows, weight.t(), out=into)
    return torch.addmm(bias, rows, weight.t(), out=into)


_AGREEMENT: dict[tuple, bool] = {}


def _agrees(size: int, ref: int, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether calls of `size` rows give every row bit for bit what calls of `ref` rows give, for this
    weight's shape, dtype and device (checked once, on random rows: a library that picks another
    kernel or another reduction order for the other size shows it in nearly every row)."""
    key = (size, ref, tuple(weight.shape), weight.dtype, weight.device, bias is not None)
    if key not in _AGREEMENT:
        gen = torch.Generator().manual_seed(size)
        x = torch.randn(ref, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
        want = _call(x, weight, bias, torch.empty(ref, weight.shape[0], dtype=x.dtype, device=x.device))
        if size < ref:  # the reference rows, `size` at a time
            got = torch.empty_like(want)
            for start in range(0, ref, size):
                _call(x[start:start + size], weight, bias, got[start:start + size])
        else:  # the reference rows at every offset of one call
            x = x.repeat(size // ref, 1)
            got = _call(x, weight, bias, torch.empty(size, weight.shape[0], dtype=x.dtype, device=x.device))
            want = want.repeat(size // ref, 1)
        _AGREEMENT[key] = torch.equal(got, want)
    return _AGREEMENT[key]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor,
           query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention, one (row, head) pair at a time.

    q: [n, S, D] (pre-scaled); k, v: [T, n, D] (the cache layout); first: [n] long, each pair's first
    real position (left padding before it); query_pos: [S] long, each query's cache position, the
    same for every pair (default T-S .. T-1: the last S positions; grouped-query attention stacks
    several heads' queries of one pair, so positions repeat). A query attends to its row's
    positions first .. its own. Returns [n, S, D] in q's dtype.
    """
    n, S, D = q.shape
    T = k.shape[0]
    runs = _runs(first)
    kh, vh = _aligned(k, runs, q.dtype), _aligned(v, runs, q.dtype)  # [n, T', D]
    if query_pos is None:
        query_pos = torch.arange(T - S, T, device=q.device)
    # Aligned position of every query (a padding query sees the row's first real key only).
    query_pos = (query_pos.to(q.device)[None, :] - first[:, None]).clamp_(min=0)  # [n, S]
    out = torch.empty_like(q)
    for g in range(0, S, QUERIES_PER_CALL):
        pos = query_pos[:, g:g + QUERIES_PER_CALL]
        qg = q[:, g:g + QUERIES_PER_CALL]
        if qg.shape[1] < QUERIES_PER_CALL:  # pad with copies of the last query (never NaN)
            fill = QUERIES_PER_CALL - qg.shape[1]
            qg = torch.cat((qg, qg[:, -1:].expand(n, fill, D)), dim=1)
            pos = torch.cat((pos, pos[:, -1:].expand(n, fill)), dim=1)
        keys = min(-(-(int(pos.max()) + 1) // KEY_ALIGN) * KEY_ALIGN, kh.shape[1])
        scores = torch.bmm(qg, kh[:, :keys].transpose(1, 2))  # [n, G, keys]
        hidden = torch.arange(keys, device=q.device)[None, None, :] > pos[:, :, None]
        probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)
        got = min(QUERIES_PER_CALL, S - g)
        out[:, g:g + got] = torch.bmm(probs, vh[:, :keys])[:, :got]
    return out


def _runs(first: torch.Tensor) -> list[tuple[int, int]]:
    """(shift, pair count) of each run of equal `first`: pairs of one row share it and sit side by
    side (a row, or a row's heads in one part of the cache)."""
    values, counts = torch.unique_consecutive(first, return_counts=True)
    return list(zip(values.tolist(), counts.tolist()))


def _aligned(x: torch.Tensor, runs: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """[T, n, D] -> [n, T', D], contiguous, with each pair's first real position at index 0; T' is T
    rounded up to KEY_ALIGN, the positions past a pair's last one zero (masked by every query).
    One strided copy per run of pairs that share a shift."""
    T, n, D = x.shape
    out = torch.empty(n, -(-T // KEY_ALIGN) * KEY_ALIGN, D, dtype=dtype, device=x.device)
    start = 0
    for shift, count in runs:
        rows = slice(start, start + count)
        out[rows, :T - shift].copy_(x[shift:, rows].transpose(0, 1))
        out[rows, T - shift:].zero_()
        start += count
    return out
