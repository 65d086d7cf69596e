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

Attention's batch-invariant kernels are engine.model.attention.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from engine.model import four_bit, packed_weight, size_checks
from engine.model.packed_weight import PackedWeight
from engine.model.kernel_shapes import chunk_plan, rows_per_call
from engine.model.scratch import reused


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


Multiply = Callable[[Weight, torch.Tensor | None, bool], torch.Tensor]  # (weight, bias, relu) -> rows @ weight.T


def relu_mlp(x: torch.Tensor, up: Weight, up_bias: torch.Tensor | None, down: Weight,
             down_bias: torch.Tensor | None, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    """linear(relu(linear(x, up, up_bias)), down, down_bias) (OPT's MLP), bit for bit, chunk by
    chunk (`_mlp_by_chunks`)."""
    return _mlp_by_chunks(x, [(up, up_bias)], down, down_bias, prompt, lambda multiply: multiply(up, up_bias, True))


def gated_mlp(x: torch.Tensor, gate: Weight, up: Weight, down: Weight,
              prompt: bool | torch.Tensor = False) -> torch.Tensor:
    """linear(silu(linear(x, gate)) * linear(x, up), down) (Llama's MLP), bit for bit, chunk by
    chunk (`_mlp_by_chunks`)."""
    return _mlp_by_chunks(x, [(gate, None), (up, None)], down, None, prompt,
                          lambda multiply: F.silu(multiply(gate, None, False)).mul_(multiply(up, None, False)))


def _mlp_by_chunks(x: torch.Tensor, inner: list[tuple[Weight, torch.Tensor | None]], down: Weight,
                   down_bias: torch.Tensor | None, prompt: bool | torch.Tensor,
                   hidden: Callable[[Multiply], torch.Tensor]) -> torch.Tensor:
    """linear(hidden(linear over x), down, down_bias) where `hidden` makes the wide activations from
    the `inner` matrices, chunk by chunk: each chunk of rows goes through every matrix before the
    next, so the hidden activations are never gathered into a whole-batch tensor (a packed
    matrix's library call returns a fresh tensor, which `linear` copies into its output: on AMX a
    third of a prefill's time went to such copies, most of them of the hidden activations). Each
    call has a size at which every matrix gives its reference's bits, so every row's numbers are
    those of `linear`, and `hidden` is elementwise over rows."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    dtype_name = str(rows.dtype).removeprefix("torch.")
    matrices = [*inner, (down, down_bias)]
    plan: list[int] = []
    if isinstance(prompt, bool) and not any(isinstance(w, four_bit.FourBitWeight) for w, _ in matrices):
        role = prompt and roles_differ(down, rows.dtype, rows.device)
        ref = rows_per_call(dtype_name, role, rows.device.type)
        plan = chunk_plan(rows.shape[0], dtype_name,
                          lambda size: all(_agrees(size, ref, w, b, role) for w, b in matrices),
                          role, rows.device.type)
    if len(plan) < 2:  # one call each (no copies to spare), or a mask of roles: layer by layer
        return linear(hidden(lambda w, b, relu: linear(x, w, b, prompt, relu)), down, down_bias, prompt)
    padded = sum(plan)
    if padded != rows.shape[0]:
        rows = torch.cat((rows, rows.new_zeros(padded - rows.shape[0], k)))
    out = torch.empty(padded, down.shape[0], dtype=rows.dtype, device=rows.device)
    start = 0
    for size in plan:
        chunk = rows[start:start + size]
        activations = hidden(lambda w, b, relu: library_linear(chunk, w, b, prefill=role, relu=relu))
        library_linear(activations, down, down_bias, out[start:start + size], prefill=role)
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
                                      lambda slot, shape, dtype: reused(slot, shape, dtype, rows.device))
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
    at each role's reference call size (checked once per shape, dtype and thread count, on the
    first such matrix and random rows: no second matrix-sized buffer; a matrix of one repeated
    value agrees in any layout, so the planner's calibration multiplies random ones); else
    `weight`. A float32 matrix stays
    plain where prompt tokens go to MKL (library_linear), which cannot read oneDNN's layout: on a
    2-vCPU Zen3 a 6-layer opt-1.3b decode step of 32 rows took a median 0.384 s plain and 0.387 s
    packed (oneDNN reorders a plain weight inside each call; a layer's matrices alone, 5-10 % slower
    plain), while a 4096-row prefill call runs ~1.2x faster on MKL than on packed oneDNN."""
    if prefill_library_differs(weight, weight.dtype, weight.device) or not packed_weight.packable(weight):
        return weight
    key = ("packed", tuple(weight.shape), weight.dtype, torch.get_num_threads())
    packed = packed_weight.pack(weight) if _AGREEMENT.get(key, True) else None  # not where it disagreed
    if key not in _AGREEMENT:
        gen = torch.Generator().manual_seed(weight.shape[0] * 31 + weight.shape[1])
        bias = torch.randn(weight.shape[0], generator=gen).to(weight.dtype)
        name = str(weight.dtype).removeprefix("torch.")
        references = {rows_per_call(name), rows_per_call(name, prompt=True)}  # each role's
        rows = [torch.randn(ref, weight.shape[1], generator=gen).to(weight.dtype) for ref in sorted(references)]
        _AGREEMENT[key] = all(torch.equal(library_linear(r, packed, bias), library_linear(r, weight, bias)) for r in rows)
    return packed if _AGREEMENT[key] else weight


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


CHECK_OUTPUTS = 1 << 20  # outputs compared per size check: a difference can be as rare as ~1e-4 of them


def _check_agreement(size: int, ref: int, weight: torch.Tensor, bias: torch.Tensor | None, prefill: bool) -> bool:
    """`_agrees`, checked on random rows: the same rows in calls of `size` and in calls of `ref`,
    round after round until CHECK_OUTPUTS outputs were compared. A library that picks another
    kernel or another reduction order for the other size shows it in some of them, sometimes only
    a few (AMX, bf16, opt-1.3b's 2048 x 2048: ~1e-4 of the outputs of a 1024-row call differ from
    256-row ones; a 32-row check of a 256-wide matrix compares 8192). On the weight itself, not on
    a random copy of its shape (the output head's would be 0.2-0.4 GB more at a run's peak); a
    matrix of one repeated value can hide the difference, so the planner's calibration multiplies
    random ones."""
    gen = torch.Generator().manual_seed(size)
    rows = max(size, ref)  # a multiple of both (every size is a divisor or multiple of the reference)
    for _ in range(max(1, -(-CHECK_OUTPUTS // (rows * weight.shape[0])))):
        x = torch.randn(rows, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
        want, got = (_in_calls(x, calls, weight, bias, prefill) for calls in (ref, size))
        if not torch.equal(got, want):
            return False
    return True


def _in_calls(x: torch.Tensor, call_rows: int, weight: torch.Tensor, bias: torch.Tensor | None,
              prefill: bool) -> torch.Tensor:
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], call_rows):
        library_linear(x[start:start + call_rows], weight, bias, out[start:start + call_rows], prefill=prefill)
    return out
