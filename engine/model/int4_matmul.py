"""Linear layers over 4-bit weights without a dequantised copy: torch's fused CPU kernel
`aten._weight_int4pack_mm_for_cpu` with bfloat16 activations.

The kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp) works on blocks of 4 rows by 64 output
features on AVX-512 (32 on AVX2); for each output element it dequantises
w = (code - 8) * scale + zero in float32 (scale, zero: bfloat16 per group of the input dimension)
and accumulates a * w with one float32 FMA per input position, in input order, then rounds the sum
to bfloat16 once. Nothing is
split along the input dimension and no sum is shared between rows, so a row's output depends on
its own activations and the weight only.
The one thing a call's shape picks is the row-block variant (1..4 rows, for the last block), so
`linear` pads the rows to a multiple of ROW_BLOCK: every row then runs in a full 4-row block, and its
bits do not depend on how many rows share the call (tests/engine/test_compression.py probes it row
by row). Calls take up to MAX_ROWS_PER_CALL rows: every call is a parallel region whose threads meet
at a barrier, and on a shared 2-core machine 4-row calls spent most of their time waiting there
(1024 rows x fc1 of opt-1.3b: 3.0 s in 4-row calls, 0.7 s in 256-row calls).

Our quantisation (engine.runtime.compression) stores per group a minimum m and a step s in fp16
and dequantises code * s + m. The kernel's grid is (code - 8) * scale + zero, so scale = s and
zero = m + 8 s, both rounded to bfloat16 (the kernel takes them in the activations' dtype): the
kernel's weights differ from dequantize(q, float32) by at most half a bfloat16 ulp of zero plus
8 half-ulps of s, about as far as dequantize(q, bfloat16) rounds each weight anyway.

Packed layout (the kernel's): blocks of F output features, F = 64 where torch's kernel runs its
AVX-512 path and 32 on its AVX2 one, uint8 [N / F, K, F / 2]: byte j of (block b, input k) holds
feature F b + j in its low nibble and F b + F / 2 + j in its high one; a last, narrower block holds
features 2i and 2i + 1 in byte i. F is found once per process by packing a probe matrix with
torch's own `_convert_weight_to_int4pack_for_cpu` (`features_per_block`); where neither layout
matches, the fused path is not used.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engine.runtime.compression import QuantizedTensor

GROUP_SIZES = (32, 64, 128, 256)  # the kernel's supported groups along the input dimension
BLOCK_CANDIDATES = (64, 32)  # output features per packed block: AVX-512, AVX2
ROW_BLOCK = 4  # the kernel's row block (BLOCK_M)
MAX_ROWS_PER_CALL = 256


@dataclass(frozen=True)
class Int4Weight:
    """A [out, in] weight in the fused kernel's operands."""
    packed: torch.Tensor            # uint8 [out, in / 2] (the kernel's blocked layout, see module doc)
    scales_and_zeros: torch.Tensor  # bfloat16 [in / group, out, 2]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_and_zeros.numel() * 2


def available() -> bool:
    return features_per_block() is not None


@functools.cache
def features_per_block() -> int | None:
    """Output features per packed block of torch's kernel on this CPU (None: no fused kernel, or a
    layout that `pack` does not write). Packs 128 x 64 known codes both ways and compares."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")):
        return None
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    theirs = ops._convert_weight_to_int4pack_for_cpu(codes, 1).reshape(-1)
    ours = _codes_to_ours(codes, group=32)
    return next((f for f in BLOCK_CANDIDATES if torch.equal(_pack_codes(ours, 128, 64, 32, f), theirs)), None)


def _codes_to_ours(codes: torch.Tensor, group: int) -> torch.Tensor:
    """int32 codes [n, k] in our packing (engine.runtime.compression): per group, element i in the
    low nibble of byte i and element i + group / 2 in its high one. -> uint8 [n, k / 2]."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // group, 2, group // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def fits(shape: tuple[int, ...], num_bits: int, group_size: int, dtype: torch.dtype,
         device: torch.device) -> bool:
    """Whether a stored [out, in] matrix can run on the fused kernel: 4 bits, bfloat16 on the CPU,
    a supported group that divides `in`, `out` a multiple of 16 (the kernel's narrowest block)."""
    return (available() and num_bits == 4 and len(shape) == 2 and dtype == torch.bfloat16
            and device.type == "cpu" and group_size in GROUP_SIZES and shape[1] % group_size == 0
            and shape[0] % 16 == 0)


def pack(q: QuantizedTensor, *, out: torch.Tensor | None = None) -> Int4Weight:
    """Our packed codes [out, groups, group / 2] rearranged into the kernel's layout with byte
    operations only (no int32 codes, no dequantisation): half the bytes of the weight touched a
    few times. `out` (uint8, out * in / 2 elements) is filled in place, e.g. a reused buffer."""
    n, k = q.shape
    packed = _pack_codes(q.data, n, k, q.group_size, features_per_block(), out)
    return Int4Weight(packed=packed.view(n, k // 2), scales_and_zeros=scales_and_zeros(q), group_size=q.group_size)


def _pack_codes(data: torch.Tensor, n: int, k: int, g: int, block: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Our packed codes of an [n, k] matrix (groups of g) in the kernel's layout of `block`
    features per block (see the module doc). -> uint8 [n * k / 2]."""
    half, blocks, groups = g // 2, n // block, k // g
    if out is None:
        out = torch.empty(n * k // 2, dtype=torch.uint8)
    data = data.reshape(n, groups, half)
    full = blocks * block
    pairs = data[:full].reshape(blocks, 2, block // 2, groups, half)
    low_rows, high_rows = pairs[:, 0], pairs[:, 1]  # features F b + j and F b + F / 2 + j
    # out[b, kk, j] viewed as [b, j, group, slot, i] with kk = group * g + slot * half + i
    into = out[:full * k // 2].view(blocks, groups, 2, half, block // 2).permute(0, 4, 1, 2, 3)
    # slot 0 (first half of a group): our low nibbles; slot 1: our high nibbles
    torch.bitwise_or(low_rows & 0x0F, high_rows << 4, out=into[:, :, :, 0])
    torch.bitwise_or(low_rows >> 4, high_rows & 0xF0, out=into[:, :, :, 1])
    if full < n:
        _pack_tail(data[full:], out[full * k // 2:])
    return out


def _pack_tail(data: torch.Tensor, out: torch.Tensor) -> None:
    """The last, narrower block (16, 32 or 48 features, e.g. of a vocabulary of 50272): the kernel
    packs it as [K, n / 2] with features 2i and 2i + 1 in the low and high nibble of byte i."""
    n, groups, half = data.shape
    codes = torch.stack((data & 0x0F, data >> 4), dim=2).view(n, -1).t()  # [K, n], input order
    torch.bitwise_or(codes[:, 0::2], codes[:, 1::2] << 4, out=out.view(-1, n // 2))


def scales_and_zeros(q: QuantizedTensor) -> torch.Tensor:
    """[in / group, out, 2] bfloat16: scale s and zero m + 8 s per (group, output feature)."""
    scale = q.scale.float()
    zero = q.minimum.float() + 8 * scale
    return torch.stack((scale, zero), dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def dequantize(weight: Int4Weight, *, out: torch.Tensor | None = None, codes: torch.Tensor | None = None,
               elements_per_pass: int = 1 << 20) -> torch.Tensor:
    """The kernel's weights as a bfloat16 [out, in] matrix (a transposed view of an input-major
    [in, out] buffer, the layout x @ W.T reads), each (code - 8) * scale + zero in float32 rounded
    once: bit for bit the weights the kernel multiplies (tests/engine/test_compression.py).
    `out` (bfloat16) and `codes` (uint8), in x out elements each, are reused buffers (fresh ones
    cost their page faults on every call). Works on whole groups of inputs, about
    `elements_per_pass` weights at a time, so that the float32 temporaries stay small."""
    n, k = weight.shape
    f, g = features_per_block(), weight.group_size
    flat = weight.packed.reshape(-1)
    codes = torch.empty(k, n, dtype=torch.uint8) if codes is None else codes.view(k, n)
    full = n // f * f
    blocks = flat[:full * k // 2].view(n // f, k, f // 2).transpose(0, 1)  # [in, block, F / 2]: see the module doc
    into = codes[:, :full].view(k, n // f, 2, f // 2)
    torch.bitwise_and(blocks, 0x0F, out=into[:, :, 0])
    torch.bitwise_right_shift(blocks, 4, out=into[:, :, 1])
    if full < n:  # the narrower last block: features 2i and 2i + 1 in byte i
        tail = flat[full * k // 2:].view(k, (n - full) // 2)
        pairs = codes[:, full:].view(k, (n - full) // 2, 2)
        torch.bitwise_and(tail, 0x0F, out=pairs[:, :, 0])
        torch.bitwise_right_shift(tail, 4, out=pairs[:, :, 1])
    out = torch.empty(k, n, dtype=torch.bfloat16) if out is None else out.view(k, n)
    scale, zero = weight.scales_and_zeros.float().unbind(-1)  # each [in / group, out]
    groups_per_pass = max(1, elements_per_pass // (g * n))
    for start in range(0, k // g, groups_per_pass):
        part = slice(start, start + groups_per_pass)
        grid = codes.view(k // g, g, n)[part].float().sub_(8)
        out.view(k // g, g, n)[part] = torch.addcmul(zero[part, None], grid, scale[part, None])
    return out.t()


def linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for bfloat16 x: [..., in] -> [..., out], row by row identical whatever the
    number of rows (zero-padded to whole ROW_BLOCKs)."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    padded = -(-m // ROW_BLOCK) * ROW_BLOCK
    if padded != m or not rows.is_contiguous():
        rows = torch.cat((rows, rows.new_zeros(padded - m, k)))
    n = weight.packed.shape[0]
    out = torch.empty(padded, n, dtype=x.dtype, device=x.device)
    mm = torch.ops.aten._weight_int4pack_mm_for_cpu
    for start in range(0, padded, MAX_ROWS_PER_CALL):
        out[start:start + MAX_ROWS_PER_CALL] = mm(rows[start:start + MAX_ROWS_PER_CALL], weight.packed,
                                                  weight.group_size, weight.scales_and_zeros)
    out = out[:m]
    if bias is not None:
        out.add_(bias)
    return out.view(*lead, n)
