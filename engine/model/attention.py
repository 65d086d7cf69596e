"""Batch-invariant attention: a query's numbers do not depend on its row's neighbours or on
prefill vs decode (engine.model.kernels says why such invariance needs fixed call shapes).

`attend`: each (row, head) pair's keys are aligned so that the row's first real position sits
at index 0 (the cache is left-padded per block, so a row's index would otherwise depend on its
neighbours' prompt lengths); queries go to `bmm` in groups of the sizes of `query_plan` (a
decode step's one query, a prefill's prompt 64 at a time, each group against the keys up to its
last query: the causal triangle's upper half is skipped), each size used only where a one-off check
finds every query's numbers bit for bit those of the reference group `QUERIES_PER_CALL`; the key
axis is padded with masked positions to a multiple of `KEY_ALIGN`, and the value product goes
to the library `KEY_ALIGN` keys at a time (`weighted_values`). Masked keys add exact zeros to
every sum, and the same positions always fall in the same SIMD lanes, so a decode step computes
a position's attention bit for bit as the prefill of the same prompt does, whatever the
neighbours' lengths.

Shapes: n (row, head) pairs, S queries, T cached positions, D head_dim.
"""
from __future__ import annotations

import torch

from engine.model import native_attention
from engine.model.key_span import KeySpan, key_span
from engine.model.kernel_shapes import KEY_ALIGN, QUERIES_PER_CALL, key_capacity, query_plan
from engine.model.scratch import reused


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor | None = None,
           query_pos: torch.Tensor | None = None, span: KeySpan | None = None) -> torch.Tensor:
    """Causal attention over a position-major cache, one (row, head) pair at a time.

    q: [n, S, D] (pre-scaled); k, v: [T, n, D] (the cache layout); first: [n] long, each pair's first
    real position (left padding before it); query_pos: [S] long, each query's cache position, the
    same for every pair (default T-S .. T-1: the last S positions; grouped-query attention stacks
    several heads' queries of one pair, so positions repeat). A query attends to its row's
    positions first .. its own. Returns [n, S, D] in q's dtype. The native kernel reads a decode
    step's cache where it is; a prefill, and the library path, copy it into the aligned layout of
    `attend_aligned` first (the same sums: the same bits). `span`: the same (first, query_pos) as a
    KeySpan made once for the step (then first and query_pos are not read).
    """
    if span is None:
        T = k.shape[0]
        if query_pos is None:
            query_pos = torch.arange(T - q.shape[1], T, device=q.device)
        span = key_span(first, query_pos)
    span = span.to(q.device)
    last_key, first = span.last_key, span.first
    native = native_attention.supports(q, k, v)
    if native and q.shape[1] <= native_attention.IN_PLACE_QUERIES:  # reads the position-major cache in place
        return native_attention.attend_position_major(q, k, v, first, span)
    # Many queries per pair (a prefill) read a pair's keys once per query: position-major, those
    # rows lie a whole position apart (64 KB in an 8-row block of opt-1.3b), and a pair-major copy
    # first is faster (opt-1.3b, 8 rows x 128 positions, bf16 on Zen4: 21 against 26-30 ms).
    runs = pair_runs(first)
    kh, vh = _aligned(k, runs, q.dtype, "keys"), _aligned(v, runs, q.dtype, "values")  # [n, T', D]
    if native:
        return native_attention.attend_aligned(q, kh, vh, span)
    return attend_aligned_library(q, kh, vh, last_key)


def attend_aligned(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, first: torch.Tensor | None = None,
                   query_pos: torch.Tensor | None = None, span: KeySpan | None = None) -> torch.Tensor:
    """`attend` over keys and values already in the aligned layout: kh, vh [n, C, D] (any stride
    between pairs), each pair's first real position at index 0, finite numbers (zeros) past its
    last, and C a multiple of KEY_ALIGN that covers every query's position. This is the layout a
    memory-resident cache keeps (engine.runtime.kv_cache), so attention reads it in place.
    On a CPU it runs on the native kernel (engine.model.native_attention) where that is built,
    else, and on a GPU, on the library's batched products (`attend_aligned_library`). `span`: as
    for `attend`."""
    span = (span or key_span(first, query_pos)).to(q.device)
    if native_attention.supports(q, kh, vh):
        return native_attention.attend_aligned(q, kh, vh, span)
    return attend_aligned_library(q, kh, vh, span.last_key)


def attend_aligned_library(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, last_key: torch.Tensor) -> torch.Tensor:
    """`attend_aligned` through `bmm` in the fixed query groups of `query_plan`, the value product
    KEY_ALIGN keys per call; last_key [n, S]: each query's aligned position."""
    n, S, D = q.shape
    out = torch.empty_like(q)
    start = 0
    for size in query_plan(S, n, min(key_capacity(int(last_key.max()) + 1), kh.shape[1])):
        _attend_group(q, kh, vh, last_key, out, start, size)
        start += size
    return out


def _attend_group(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, query_pos: torch.Tensor,
                  out: torch.Tensor, start: int, size: int) -> None:
    """Queries start .. start+size-1 (padded with copies of the last query, never NaN) into `out`;
    split into reference groups where the library's numbers for `size` differ from theirs."""
    n, S, D = q.shape
    got = min(size, S - start)
    pos, qg = query_pos[:, start:start + got], q[:, start:start + got]
    keys = min(key_capacity(int(pos.max()) + 1), kh.shape[1])
    if size != QUERIES_PER_CALL and not _group_agrees(size, n, keys, D, q.dtype, q.device):
        for sub in range(start, start + got, QUERIES_PER_CALL):
            _attend_group(q, kh, vh, query_pos, out, sub, QUERIES_PER_CALL)
        return
    if got < size:
        qg = torch.cat((qg, qg[:, -1:].expand(n, size - got, D)), dim=1)
        pos = torch.cat((pos, pos[:, -1:].expand(n, size - got)), dim=1)
    scores = torch.bmm(qg, kh[:, :keys].transpose(1, 2), out=reused("scores", (n, size, keys), q.dtype, q.device))
    scores.masked_fill_(torch.arange(keys, device=q.device) > pos[:, :, None], float("-inf"))
    weighted = weighted_values(torch.softmax(scores, dim=-1), vh[:, :keys],
                               reused("weighted", (n, size, D), q.dtype, q.device),
                               reused("partial", (n, size, D), q.dtype, q.device))
    out[:, start:start + got] = weighted[:, :got]


def weighted_values(probs: torch.Tensor, values: torch.Tensor, into: torch.Tensor | None = None,
                    partial: torch.Tensor | None = None) -> torch.Tensor:
    """probs [n, S, C] @ values [n, C, D], KEY_ALIGN keys per library call, the calls' results
    added in key order. One call over all C keys would let the library block its sum over the key
    axis by C (MKL's fp32 batched product does, from 192 keys on): a query's output would then depend
    on how many keys its neighbours make the call read, and a prefill's on its query group. Keys past
    a query's last add exact zeros, so its output is the same for every C that covers it."""
    C = probs.shape[-1]
    into = torch.bmm(probs[:, :, :KEY_ALIGN], values[:, :KEY_ALIGN], out=into)
    for at in range(KEY_ALIGN, C, KEY_ALIGN):
        into.add_(torch.bmm(probs[:, :, at:at + KEY_ALIGN], values[:, at:at + KEY_ALIGN], out=partial))
    return into


_GROUP_AGREEMENT: dict[tuple, bool] = {}


def _group_agrees(size: int, n: int, keys: int, D: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a group of `size` queries gets, from the scores product through softmax to the value
    product, every query's numbers bit for bit as the reference group does, for n pairs over
    `keys` keys (checked once per call shape, on random numbers)."""
    key = (size, n, keys, D, dtype, device, torch.get_num_threads())
    if key not in _GROUP_AGREEMENT:
        gen = torch.Generator().manual_seed(size)
        q, k, v = (torch.randn(n, rows, D, generator=gen).to(device, dtype)
                   for rows in (max(size, QUERIES_PER_CALL), keys, keys))

        def product(queries: torch.Tensor) -> torch.Tensor:
            return weighted_values(torch.softmax(torch.bmm(queries, k.transpose(1, 2)), dim=-1), v)

        want = torch.cat([product(q[:, g:g + QUERIES_PER_CALL]) for g in range(0, q.shape[1], QUERIES_PER_CALL)], 1)
        _GROUP_AGREEMENT[key] = torch.equal(product(q[:, :size]), want[:, :size])
    return _GROUP_AGREEMENT[key]


def pair_runs(first: torch.Tensor) -> list[tuple[int, int]]:
    """(shift, pair count) of each run of equal `first`: pairs of one row share it and sit side by
    side (a row, or a row's heads in one part of the cache)."""
    values, counts = torch.unique_consecutive(first, return_counts=True)
    return list(zip(values.tolist(), counts.tolist()))


def _aligned(x: torch.Tensor, runs: list[tuple[int, int]], dtype: torch.dtype, slot: str) -> torch.Tensor:
    """[T, n, D] -> [n, T', D], contiguous, with each pair's first real position at index 0; T' is T
    rounded up to KEY_ALIGN, the positions past a pair's last one zero (masked by every query).
    One strided copy per run of pairs that share a shift, into the thread's `slot` scratch buffer."""
    T, n, D = x.shape
    out = reused(slot, (n, key_capacity(T), D), dtype, x.device)
    start = 0
    for shift, count in runs:
        rows = slice(start, start + count)
        out[rows, :T - shift].copy_(x[shift:, rows].transpose(0, 1))
        out[rows, T - shift:].zero_()
        start += count
    return out
