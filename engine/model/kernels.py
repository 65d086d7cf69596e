"""Batch-invariant kernels: a row's numbers do not depend on its neighbours or on prefill vs decode.

A BLAS picks its blocking, its K-split and its micro-kernel by the shape of the call: on a CPU the
same row multiplied by the same weights gives different low bits when 1, 8 or 600 rows share the
call (MKL's fp32 gemv for one row; oneDNN's bf16 kernels differ for 33..256 rows on AMX). Greedy
decoding turns such a bit into a different token wherever two logits are close. The way out
(He et al., "Defeating Nondeterminism in LLM Inference", 2025) is to give every reduction one
fixed order: here, by calling the library only with shapes that never vary.

- `linear`: rows go to the library in chunks of fixed sizes (the last chunk zero-padded): the
  reference size `rows_per_call(dtype, role)`, and the other sizes of `chunk_sizes(dtype)` only
  where a one-off check on random rows finds that the library gives every row bit for bit the
  reference's numbers at that size (oneDNN's bf16 kernels on AVX512-BF16 do for 2..4096 rows; on
  AMX they fall into classes by size). So a decode step of 32 rows is one 32-row call, and every
  row of every call gets its reference's numbers. The reference, and for float32 on a CPU the
  library (MKL for a prefill's thousands of rows, oneDNN for a decode step's few), follow the
  token's role, not the step: prompt tokens are always computed the prompt's way, generated
  tokens the decode way, also when a resumed row's saved tokens are computed in its prefill step.
- `attend`: each (row, head) pair's keys are aligned so that the row's first real position sits
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

import functools
import math
import threading

import torch

from engine.model import four_bit, native_attention, packed_weight, size_checks
from engine.model.packed_weight import PackedWeight
from engine.model.kernel_shapes import KEY_ALIGN, QUERIES_PER_CALL, chunk_plan, key_capacity, query_plan, rows_per_call


Weight = torch.Tensor | PackedWeight | four_bit.FourBitWeight


def linear(x: torch.Tensor, weight: Weight,
           bias: torch.Tensor | None = None, prompt: bool | torch.Tensor = False, relu: bool = False) -> torch.Tensor:
    """F.linear whose rows do not depend on how many rows share the call. x: [..., K] -> [..., N].
    `prompt` says which rows are prompt tokens (True: all, False: none, or a bool tensor over x's
    leading dims). Where the two roles are computed differently (`roles_differ`), each row goes
    the way of its role, so a token's numbers depend on its role only, never on the step that
    computes it (a resumed row's saved tokens are computed in its prefill step, as generated ones).
    `relu`: max(0, .) of the result, inside oneDNN's call where it runs (one pass over the output
    fewer; the same bits, since rounding keeps a number's sign)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows, n = x.reshape(-1, k), weight.shape[0]
    if not roles_differ(weight, rows.dtype, rows.device):
        prompt = False  # one way for every token: one set of size checks, no device sync on a mask
    elif isinstance(prompt, torch.Tensor):
        mask = prompt.reshape(-1)
        every, some = bool(mask.all()), bool(mask.any())
        if every or not some:
            prompt = every
        else:  # a resumed row's saved tokens beside prompt tokens: each group its own way
            out = torch.empty(rows.shape[0], n, dtype=x.dtype, device=x.device)
            for role, index in ((True, mask.nonzero()[:, 0]), (False, (~mask).nonzero()[:, 0])):
                out[index] = _role_linear(rows[index], weight, bias, role, relu)
            return out.view(*lead, n)
    return _role_linear(rows, weight, bias, bool(prompt), relu).view(*lead, n)


def relu_mlp(x: torch.Tensor, up: Weight, up_bias: torch.Tensor | None, down: Weight,
             down_bias: torch.Tensor | None, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    """linear(relu(linear(x, up, up_bias)), down, down_bias), bit for bit, but chunk by chunk: each
    chunk of rows goes through both matrices before the next, so the wide hidden activations are
    never gathered into a whole-batch tensor (a packed matrix's library call returns a fresh
    tensor, which `linear` copies into its output: on AMX a third of a prefill's time went to
    such copies, most of them of the hidden activations). Each call has a size at which both
    matrices give their reference's bits, so every row's numbers are those of `linear`."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    dtype_name = str(rows.dtype).removeprefix("torch.")
    plan: list[int] = []
    if isinstance(prompt, bool) and not isinstance(up, four_bit.FourBitWeight) \
            and not isinstance(down, four_bit.FourBitWeight):
        role = prompt and roles_differ(up, rows.dtype, rows.device)
        ref = rows_per_call(dtype_name, role, rows.device.type)
        plan = chunk_plan(rows.shape[0], dtype_name,
                          lambda size: _agrees(size, ref, up, up_bias, role) and _agrees(size, ref, down, down_bias, role),
                          role, rows.device.type)
    if len(plan) < 2:  # one call each (no copies to spare), or a mask of roles: layer by layer
        return linear(linear(x, up, up_bias, prompt, relu=True), down, down_bias, prompt)
    padded = sum(plan)
    if padded != rows.shape[0]:
        rows = torch.cat((rows, rows.new_zeros(padded - rows.shape[0], k)))
    out = torch.empty(padded, down.shape[0], dtype=rows.dtype, device=rows.device)
    start = 0
    for size in plan:
        hidden = library_linear(rows[start:start + size], up, up_bias, prefill=role, relu=True)
        library_linear(hidden, down, down_bias, out[start:start + size], prefill=role)
        start += size
    return out[:x.numel() // k].view(*lead, down.shape[0])


def roles_differ(weight, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prompt and generated tokens are computed differently for this weight on this device:
    float32 on two libraries (`prefill_library_differs`), a 4-bit weight that a 4-bit kernel
    multiplies (engine.model.four_bit; prompt tokens multiply its dequantised copy on the library:
    a prefill's thousands of rows run faster there), or references
    of different sizes for the two roles (kernel_shapes.PROMPT_ROWS_PER_CALL, on a CPU)."""
    if isinstance(weight, four_bit.FourBitWeight):
        return True
    name = str(dtype).removeprefix("torch.")
    return prefill_library_differs(weight, dtype, device) or (
        device.type == "cpu" and rows_per_call(name, prompt=True) != rows_per_call(name))


def _role_linear(rows: torch.Tensor, weight: Weight, bias: torch.Tensor | None, prompt: bool,
                 relu: bool = False) -> torch.Tensor:
    """rows [M, K] of one token role -> [M, N]. A 4-bit weight: generated tokens on its kernel
    (each row's bits independent of the call, so no fixed call sizes), prompt tokens on the
    library over its dequantised copy, made in a reused buffer."""
    if isinstance(weight, four_bit.FourBitWeight):
        if not prompt:
            out = four_bit.multiply(rows, weight, bias)
            return out.relu_() if relu else out
        weight = four_bit.dequantized(weight, rows.dtype,
                                      lambda slot, shape, dtype: _scratch(slot, shape, dtype, rows.device))
    return _chunked_linear(rows, weight, bias, prompt, relu)


def _chunked_linear(rows: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None,
                    prompt: bool, relu: bool = False) -> torch.Tensor:
    """rows [M, K] in calls of the fixed sizes of chunk_plan (the last one zero-padded) -> [M, N]."""
    m, k = rows.shape
    dtype_name = str(rows.dtype).removeprefix("torch.")
    ref = rows_per_call(dtype_name, prompt, rows.device.type)
    plan = chunk_plan(m, dtype_name, lambda size: _agrees(size, ref, weight, bias, prompt), prompt, rows.device.type)
    if plan == [m]:  # one call, no padding: its output is the result
        return library_linear(rows, weight, bias, prefill=prompt, relu=relu)
    padded = sum(plan)
    if padded != m:
        rows = torch.cat((rows, rows.new_zeros(padded - m, k)))
    out = torch.empty(padded, weight.shape[0], dtype=rows.dtype, device=rows.device)
    start = 0
    for size in plan:
        library_linear(rows[start:start + size], weight, bias, out[start:start + size], prefill=prompt, relu=relu)
        start += size
    return out[:m]


def library_linear(rows: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None,
                   into: torch.Tensor | None = None, *, prefill: bool = False, relu: bool = False) -> torch.Tensor:
    """One call of the math library: rows [M, K] @ weight [N, K].T (+ bias). float32 on the CPU
    has two libraries, each faster at its own shapes (2-vCPU AVX2 Zen3, opt-1.3b matrices): a
    decode step's 32-64 rows run on oneDNN (65-120 GFLOP/s; MKL's sgemm 20-97) and a prefill's
    thousands on MKL's sgemm (torch.mm there: 128-148 GFLOP/s; oneDNN 102-127). So prompt tokens
    (`prefill`) go to MKL and generated tokens to oneDNN, whatever step computes them
    (`linear`). Other dtypes and devices have one library (bfloat16 on a CPU with native bf16 runs
    on oneDNN through torch.mm). A packed weight (pack_for_cpu) goes to oneDNN as it is. `relu`
    runs in oneDNN's call (a post-op) where the call is oneDNN's, else on the result."""
    if isinstance(weight, PackedWeight):
        out = packed_weight.linear(rows, weight, bias, relu)
        return out if into is None else into.copy_(out)
    if not prefill and prefill_library_differs(weight, rows.dtype, rows.device):
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "relu" if relu else "none", [], "")
        return out if into is None else into.copy_(out)
    if into is None:
        into = torch.empty(rows.shape[0], weight.shape[0], dtype=rows.dtype, device=rows.device)
    if bias is None:
        torch.mm(rows, weight.t(), out=into)
    else:
        torch.addmm(bias, rows, weight.t(), out=into)
    return into.relu_() if relu else into


def prefill_library_differs(weight, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether prompt and generated tokens go to different libraries for this weight: a plain
    float32 matrix on a CPU where torch has oneDNN's linear (library_linear)."""
    return (dtype == torch.float32 and device.type == "cpu" and isinstance(weight, torch.Tensor)
            and _onednn_fp32())


@functools.cache
def _onednn_fp32() -> bool:
    """Whether torch's oneDNN linear runs here and agrees with torch.mm to float32 rounding (checked
    once per process; a build without it, or one that fails, keeps MKL for every token)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, generator=gen), torch.randn(32, 64, generator=gen)
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    except RuntimeError:
        return False
    return got.shape == (8, 32) and torch.allclose(got, x @ w.t(), rtol=1e-4, atol=1e-4)


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | PackedWeight:
    """A matrix that stays in RAM, in the layout the library would otherwise reorder it into on
    every call (engine.model.packed_weight), where that gives every row the plain weight's numbers
    at each role's reference call size (checked once per shape, dtype and thread count, on a random
    matrix of that shape and random rows: constant weights would agree in any layout); else
    `weight`. A float32 matrix stays
    plain where prompt tokens go to MKL (library_linear), which cannot read oneDNN's layout: on a
    2-vCPU Zen3 a 6-layer opt-1.3b decode step of 32 rows took a median 0.384 s plain and 0.387 s
    packed (oneDNN reorders a plain weight inside each call; a layer's matrices alone, 5-10 % slower
    plain), while a 4096-row prefill call runs ~1.2x faster on MKL than on packed oneDNN."""
    if prefill_library_differs(weight, weight.dtype, weight.device) or not packed_weight.packable(weight):
        return weight
    key = ("packed", tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _AGREEMENT:
        gen = torch.Generator().manual_seed(weight.shape[0] * 31 + weight.shape[1])
        plain = _random_like(weight, gen)
        bias = torch.randn(weight.shape[0], generator=gen).to(weight.dtype)
        name = str(weight.dtype).removeprefix("torch.")
        references = {rows_per_call(name), rows_per_call(name, prompt=True)}  # each role's
        rows = [torch.randn(ref, weight.shape[1], generator=gen).to(weight.dtype) for ref in sorted(references)]
        packed = packed_weight.pack(plain)
        _AGREEMENT[key] = all(torch.equal(library_linear(r, packed, bias), library_linear(r, plain, bias)) for r in rows)
    return packed_weight.pack(weight) if _AGREEMENT[key] else weight


_AGREEMENT: dict[tuple, bool] = {}


def _agrees(size: int, ref: int, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool) -> bool:
    """Whether calls of `size` rows give every row bit for bit what calls of `ref` rows give, for this
    weight's shape, layout, dtype and device and the library of `prefill` (checked once per machine:
    engine.model.size_checks remembers a CPU check's answer for later processes)."""
    layout = tuple(weight.stride()) if isinstance(weight, torch.Tensor) else None  # a transposed view runs other kernels
    key = (size, ref, type(weight), tuple(weight.shape), layout, weight.dtype, weight.device, bias is not None,
           prefill, torch.get_num_threads())
    if key not in _AGREEMENT:
        stored = repr(key[:2] + (type(weight).__name__,) + key[3:]) if weight.device.type == "cpu" else None
        known = size_checks.recall(stored) if stored is not None else None
        _AGREEMENT[key] = known if known is not None else _check_agreement(size, ref, weight, bias, prefill)
        if stored is not None and known is None:
            size_checks.remember(stored, _AGREEMENT[key])
    return _AGREEMENT[key]


def _check_agreement(size: int, ref: int, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool) -> bool:
    """`_agrees`, checked on random rows and a random matrix of the weight's shape and layout: a
    library that picks another kernel or another reduction order for the other size shows it in
    nearly every row. Not on the weight itself: its values may hide the difference (the planner's
    calibration multiplies constant matrices, which sum to the same bits in any order)."""
    gen = torch.Generator().manual_seed(size)
    weight = _random_like(weight, gen)
    bias = None if bias is None else torch.randn(weight.shape[0], generator=gen).to(weight.device, weight.dtype)
    x = torch.randn(ref, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    want = library_linear(x, weight, bias, prefill=prefill)
    if size < ref:  # the reference rows, `size` at a time
        got = torch.empty_like(want)
        for start in range(0, ref, size):
            library_linear(x[start:start + size], weight, bias, got[start:start + size], prefill=prefill)
    else:  # the reference rows at every offset of one call
        got = library_linear(x.repeat(size // ref, 1), weight, bias, prefill=prefill)
        want = want.repeat(size // ref, 1)
    return torch.equal(got, want)


def _random_like(weight: torch.Tensor | PackedWeight, gen: torch.Generator) -> torch.Tensor | PackedWeight:
    """A random matrix of `weight`'s shape, dtype, device and layout (packed, or its strides)."""
    plain = torch.randn(weight.shape, generator=gen).to(weight.device, weight.dtype)
    if isinstance(weight, PackedWeight):
        return packed_weight.pack(plain)
    return torch.empty_strided(weight.shape, weight.stride(), dtype=weight.dtype, device=weight.device).copy_(plain)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor,
           query_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over a position-major cache, one (row, head) pair at a time.

    q: [n, S, D] (pre-scaled); k, v: [T, n, D] (the cache layout); first: [n] long, each pair's first
    real position (left padding before it); query_pos: [S] long, each query's cache position, the
    same for every pair (default T-S .. T-1: the last S positions; grouped-query attention stacks
    several heads' queries of one pair, so positions repeat). A query attends to its row's
    positions first .. its own. Returns [n, S, D] in q's dtype. The native kernel reads the cache
    where it is; the library path copies it into the aligned layout of `attend_aligned` first.
    """
    T = k.shape[0]
    if query_pos is None:
        query_pos = torch.arange(T - q.shape[1], T, device=q.device)
    last_key = _last_keys(q, first, query_pos)
    if native_attention.supports(q, k, v):  # reads the position-major cache in place
        return native_attention.attend_position_major(q, k, v, first, last_key)
    runs = pair_runs(first)
    kh, vh = _aligned(k, runs, q.dtype, "keys"), _aligned(v, runs, q.dtype, "values")  # [n, T', D]
    return attend_aligned_library(q, kh, vh, last_key)


def attend_aligned(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, first: torch.Tensor,
                   query_pos: torch.Tensor) -> torch.Tensor:
    """`attend` over keys and values already in the aligned layout: kh, vh [n, C, D] (any stride
    between pairs), each pair's first real position at index 0, finite numbers (zeros) past its
    last, and C a multiple of KEY_ALIGN that covers every query's position. This is the layout a
    memory-resident cache keeps (engine.runtime.kv_cache), so attention reads it in place.
    On a CPU it runs on the native kernel (engine.model.native_attention) where that is built,
    else, and on a GPU, on the library's batched products (`attend_aligned_library`)."""
    last_key = _last_keys(q, first, query_pos)
    if native_attention.supports(q, kh, vh):
        return native_attention.attend_aligned(q, kh, vh, last_key)
    return attend_aligned_library(q, kh, vh, last_key)


def _last_keys(q: torch.Tensor, first: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """[n, S]: each query's aligned position, the last key it attends (a padding query, before its
    row's first real position, sees that first key only)."""
    return (query_pos.to(q.device)[None, :] - first[:, None]).clamp_(min=0)


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
    scores = torch.bmm(qg, kh[:, :keys].transpose(1, 2), out=_scratch("scores", (n, size, keys), q.dtype, q.device))
    scores.masked_fill_(torch.arange(keys, device=q.device) > pos[:, :, None], float("-inf"))
    weighted = weighted_values(torch.softmax(scores, dim=-1), vh[:, :keys],
                               _scratch("weighted", (n, size, D), q.dtype, q.device),
                               _scratch("partial", (n, size, D), q.dtype, q.device))
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
    out = _scratch(slot, (n, key_capacity(T), D), dtype, x.device)
    start = 0
    for shift, count in runs:
        rows = slice(start, start + count)
        out[rows, :T - shift].copy_(x[shift:, rows].transpose(0, 1))
        out[rows, T - shift:].zero_()
        start += count
    return out


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `shape` that the calling thread reuses from call to call (grown when too small):
    attention rewrites its aligned keys, values and scores every call, and a fresh multi-MB tensor
    would cost its page faults every time (the engine's allocator unmaps big blocks when freed)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    # A buffer made under inference_mode (the profiler's probes) cannot be written outside it.
    numel, key = math.prod(shape), (slot, dtype, device, torch.is_inference_mode_enabled())
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel].view(shape)
