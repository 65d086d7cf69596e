"""Group-wise asymmetric min-max quantisation of weights and the KV cache (FlexGen, Sheng et al.
2023, section 5: "group-wise quantization", 4 bits, group size 64; their `compression.py`).

A tensor is cut into groups of `group_size` consecutive elements along `dim` (the input dimension
of an nn.Linear weight [out, in]; head_dim for the KV cache [B, H, S, D]). Each group keeps its
minimum m and a step s = (max - m) / (2**bits - 1) in fp16, and every element the integer code
round((x - m) / s) in 0 .. 2**bits - 1; dequantisation is code * s + m.

Choices (and why):
- m is rounded *down* and s *up* to fp16, so the fp16 grid m + [0, 2**bits - 1] * s still covers
  the group's [min, max]: no code is ever clamped, and every element is within s / 2 of its
  dequantised value (plus the rounding of the dtype dequantisation computes in). A constant
  group gets s = 0 (or one fp16 ulp) and never divides by zero.
- Shapes that are not a multiple of the group size are padded internally by repeating the last
  element along `dim` (zeros would widen the last group's range); the padding is stripped on
  dequantisation.
- Packing: codes sit in a container of 2, 4 or 8 bits (the next power of two >= bits: 3 bits use
  4-bit containers, 5..7 bits one byte), so 8 // container codes share a byte. The layout inside
  a group is planar: byte j holds code j in its low bits, code j + bytes_per_group in the next
  slot, and so on, so unpacking writes whole contiguous runs instead of strided elements.
- Leading dimensions are kept: `data` is [*lead, n_groups, bytes_per_group] and `scale`/`minimum`
  are [*lead, n_groups], where `lead` is the shape without `dim`. Slicing a leading dimension
  (the sequence axis of a cache) slices all three alike, so a cache can be written step by step.

Serialised layout (one contiguous uint8 tensor, `to_bytes`/`from_bytes`, zero-copy views):
    [data: n_groups_total * bytes_per_group][scale fp16: 2 * n_groups_total][minimum fp16: same]
each section starting at a multiple of ALIGN (64) bytes; `packed_nbytes` gives the total.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.runtime.tiers import align_up

ALIGN = 64  # byte alignment of each section of the serialised layout (cache line / AVX-512)
_CHUNK_ELEMENTS = 1 << 22  # dequantise 4M elements at a time: passes run from L3, few parallel regions


@dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
    data: torch.Tensor     # uint8 [*lead, n_groups, bytes_per_group]
    scale: torch.Tensor    # fp16 [*lead, n_groups]
    minimum: torch.Tensor  # fp16 [*lead, n_groups]
    shape: tuple[int, ...]  # the original shape
    dim: int               # the grouped dimension, non-negative
    group_size: int
    num_bits: int

    @property
    def nbytes(self) -> int:
        """Bytes of the three tensors (packed_nbytes adds the section alignment)."""
        return self.data.numel() + 2 * self.scale.numel() + 2 * self.minimum.numel()


@dataclass(frozen=True)
class _Layout:
    lead: tuple[int, ...]  # shape without dim
    length: int            # size of dim
    num_groups: int        # groups along dim
    per_byte: int          # codes per byte
    container_bits: int
    bytes_per_group: int

    @property
    def rows(self) -> int:
        return math.prod(self.lead)

    @property
    def padded_group(self) -> int:  # codes per group including the packing padding
        return self.bytes_per_group * self.per_byte

    def sections(self) -> tuple[int, int, int, int]:
        """Byte offsets of data, scale, minimum, and the total size."""
        data = self.rows * self.num_groups * self.bytes_per_group
        groups = 2 * self.rows * self.num_groups
        scale_at = _align(data)
        min_at = scale_at + _align(groups)
        return 0, scale_at, min_at, min_at + _align(groups)


def _align(n: int) -> int:
    return align_up(n, ALIGN)


def _layout(shape, num_bits: int, group_size: int, dim: int) -> tuple[_Layout, int]:
    shape = tuple(int(s) for s in shape)
    if not 2 <= num_bits <= 8:
        raise ValueError(f"num_bits must be 2..8, got {num_bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not shape:
        raise ValueError("cannot quantise a 0-d tensor")
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"dim {dim} is out of range for shape {shape}")
    dim %= len(shape)
    container = 2 if num_bits == 2 else 4 if num_bits <= 4 else 8
    per_byte = 8 // container
    length = shape[dim]
    return _Layout(lead=shape[:dim] + shape[dim + 1:], length=length,
                   num_groups=-(-length // group_size), per_byte=per_byte,
                   container_bits=container,
                   bytes_per_group=-(-group_size // per_byte)), dim


def row_sections(shape, num_bits: int = 4, group_size: int = 64) -> list[tuple[int, int]]:
    """(offset of the section, bytes per row) of data, scale and minimum in the serialised form of a
    2-D tensor grouped along its rows (dim=-1): row r of each section starts at offset + r * bytes,
    so rows can be read without the rest (a lookup table on disk)."""
    layout, _ = _layout(shape, num_bits, group_size, -1)
    data_at, scale_at, min_at, _ = layout.sections()
    groups = layout.num_groups
    return [(data_at, groups * layout.bytes_per_group), (scale_at, 2 * groups), (min_at, 2 * groups)]


def packed_nbytes(shape, num_bits: int = 4, group_size: int = 64, dim: int = -1) -> int:
    """Size of the serialised form (to_bytes) of a tensor of `shape`:
    align(R*ng*ceil(G/p)) + 2 * align(2*R*ng), with R = numel / shape[dim], ng = ceil(shape[dim] / G),
    p = codes per byte (4 for 2 bits, 2 for 3-4 bits, 1 for 5-8 bits), align = up to 64 bytes."""
    return _layout(shape, num_bits, group_size, dim)[0].sections()[3]


def quantize_scratch_bytes(numel: int) -> int:
    """Peak temporary bytes `quantize` takes for a tensor of numel elements: it works on chunks of
    at most _CHUNK_ELEMENTS, each converted to float32, offset, scaled (three float32 copies at most
    alive) and cast to uint8 codes."""
    return 13 * min(numel, _CHUNK_ELEMENTS)


# --------------------------------------------------------------------------------------------
# quantise


def quantize(x: torch.Tensor, *, num_bits: int = 4, group_size: int = 64, dim: int = -1,
             out: QuantizedTensor | None = None) -> QuantizedTensor:
    """Quantise `x` (any float dtype, finite, within the fp16 range) group-wise along `dim`.

    With `out` (e.g. `from_bytes` over a preallocated buffer of packed_nbytes(x.shape, ...)), the
    result is written into its tensors, so a weight store can quantise straight into its file buffer.
    """
    layout, dim = _layout(x.shape, num_bits, group_size, dim)
    rows, ng, bpg = layout.rows, layout.num_groups, layout.bytes_per_group
    if out is None:
        data = torch.empty(rows, ng, bpg, dtype=torch.uint8, device=x.device)
        scale = torch.empty(rows, ng, dtype=torch.float16, device=x.device)
        minimum = torch.empty(rows, ng, dtype=torch.float16, device=x.device)
    else:
        if (out.shape, out.dim, out.num_bits, out.group_size) != (tuple(x.shape), dim, num_bits, group_size):
            raise ValueError("`out` was laid out for another shape, dim, num_bits or group_size")
        data, scale, minimum = (out.data.view(rows, ng, bpg), out.scale.view(rows, ng),
                                out.minimum.view(rows, ng))
    rows_x = x.detach().movedim(dim, -1).reshape(rows, layout.length)  # [R, D], a view if it can be
    step = max(1, _CHUNK_ELEMENTS // max(1, layout.length))
    for r in range(0, rows, step):  # bounded float32 temporaries for large tensors
        d, s, m = _quantize_rows(rows_x[r:r + step], num_bits=num_bits, group_size=group_size,
                                 layout=layout)
        data[r:r + step], scale[r:r + step], minimum[r:r + step] = d, s, m
    if out is not None:
        return out
    return QuantizedTensor(data=data.view(*layout.lead, ng, bpg), scale=scale.view(*layout.lead, ng),
                           minimum=minimum.view(*layout.lead, ng), shape=tuple(x.shape), dim=dim,
                           group_size=group_size, num_bits=num_bits)


def _quantize_rows(x: torch.Tensor, *, num_bits: int, group_size: int, layout: _Layout):
    """x: [r, D] -> packed codes [r, ng, bpg] uint8, scale and minimum [r, ng] fp16."""
    r, ng, g = x.shape[0], layout.num_groups, group_size
    x = x.float()
    pad = ng * g - layout.length
    if pad:  # repeat the last element: padding must not widen the last group's range
        x = torch.cat([x, x[:, -1:].expand(r, pad)], dim=1)
    x = x.reshape(r, ng, g)                                   # [r, ng, G]
    levels = (1 << num_bits) - 1
    minimum = _round_fp16(x.amin(dim=-1), down=True)          # [r, ng]
    scale = _round_fp16((x.amax(dim=-1) - minimum.float()) / levels, down=False)
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise ValueError("cannot quantise: the tensor has NaN/inf or values beyond the fp16 range")
    step = scale.float()
    step = torch.where(step == 0, 1.0, step)                  # constant group: every code is 0
    codes = ((x - minimum.float()[..., None]) / step[..., None]).round_().clamp_(0, levels)
    codes = codes.to(torch.uint8)                             # [r, ng, G]
    return _pack(codes, layout), scale, minimum


def _round_fp16(x: torch.Tensor, *, down: bool) -> torch.Tensor:
    """float32 -> the nearest fp16 at or below (down) / at or above (up) each value."""
    h = x.to(torch.float16)
    wrong = h.float() > x if down else h.float() < x
    toward = torch.full_like(h, -math.inf if down else math.inf)  # same device as x
    return torch.where(wrong, torch.nextafter(h, toward), h)


def _pack(codes: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """codes [r, ng, G] uint8 -> [r, ng, bpg]: slot k of byte j holds code j + k * bpg."""
    r, ng, g = codes.shape
    bpg, p, cb = layout.bytes_per_group, layout.per_byte, layout.container_bits
    if p == 1:
        return codes
    if layout.padded_group != g:
        codes = torch.cat([codes, codes.new_zeros(r, ng, layout.padded_group - g)], dim=-1)
    slots = codes.view(r, ng, p, bpg)
    packed = slots[:, :, 0].clone()
    for k in range(1, p):  # a loop over byte slots (<= 4), not elements
        packed |= slots[:, :, k] << (cb * k)
    return packed


# --------------------------------------------------------------------------------------------
# dequantise


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The tensor of q.shape that q stands for, computed in `dtype` arithmetic (code * s + m).

    `out` (contiguous, q.shape, dtype) avoids allocating the result each call: a freshly
    allocated large tensor costs page faults on first touch, about as much as the work itself.
    Fast path: dim is the last dimension and its size a multiple of the group size (nn.Linear
    weights [out, in] and a cache [B, H, S, D] with the defaults); otherwise one more copy.
    """
    layout, dim = _layout(q.shape, q.num_bits, q.group_size, q.dim)
    rows, ng, g = layout.rows, layout.num_groups, q.group_size
    direct = dim == len(q.shape) - 1 and ng * g == layout.length
    if out is not None:
        if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"`out` must be a contiguous {dtype} tensor of shape {q.shape}")
    if direct:
        result = out if out is not None else torch.empty(q.shape, dtype=dtype, device=q.data.device)
        grouped = result.view(rows, ng, g)
    else:
        grouped = torch.empty(rows, ng, g, dtype=dtype, device=q.data.device)
    data = q.data.reshape(rows, ng, layout.bytes_per_group)
    scale, minimum = q.scale.reshape(rows, ng, 1), q.minimum.reshape(rows, ng, 1)
    step = max(1, _CHUNK_ELEMENTS // max(1, ng * g)) if q.data.device.type == "cpu" else max(1, rows)
    for r in range(0, rows, step):  # CPU: chunks of rows, so the three passes run out of the cache
        o = grouped[r:r + step]
        _unpack_into(o, data[r:r + step], layout)
        o.mul_(scale[r:r + step].to(dtype)).add_(minimum[r:r + step].to(dtype))
    if direct:
        return result
    moved = grouped.view(rows, ng * g)[:, :layout.length]
    lead_shape = tuple(q.shape[:dim]) + tuple(q.shape[dim + 1:])
    value = moved.reshape(*lead_shape, layout.length).movedim(-1, dim)
    if out is None:
        return value.contiguous()
    return out.copy_(value)


def _unpack_into(out: torch.Tensor, data: torch.Tensor, layout: _Layout) -> None:
    """data [r, ng, bpg] uint8 -> codes written (converted) into out [r, ng, G]."""
    bpg, p, cb = layout.bytes_per_group, layout.per_byte, layout.container_bits
    g = out.shape[-1]
    if p == 1:
        out.copy_(data)
        return
    mask = (1 << cb) - 1
    for k in range(p):  # slot k holds codes k*bpg .. (k+1)*bpg - 1 of each group
        lo, hi = k * bpg, min(g, (k + 1) * bpg)
        if lo >= hi:
            break
        src = data[..., :hi - lo]
        if k:
            src = src >> (cb * k)
        if k < p - 1:
            src = src & mask
        out[..., lo:hi] = src


# --------------------------------------------------------------------------------------------
# serialise


def to_bytes(q: QuantizedTensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """One contiguous uint8 tensor of packed_nbytes(q.shape, ...) bytes (layout: module docstring).
    `out` (uint8, at least that many bytes, e.g. an aligned/pinned I/O buffer) is written in place."""
    layout, _ = _layout(q.shape, q.num_bits, q.group_size, q.dim)
    total = layout.sections()[3]
    if out is None:
        out = torch.zeros(total, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < total:
        raise ValueError(f"`out` must be a 1-D uint8 tensor of at least {total} bytes")
    view = from_bytes(out, q.shape, num_bits=q.num_bits, group_size=q.group_size, dim=q.dim)
    view.data.copy_(q.data)
    view.scale.copy_(q.scale)
    view.minimum.copy_(q.minimum)
    return out[:total]


def from_bytes(buf: torch.Tensor, shape, *, num_bits: int = 4, group_size: int = 64,
               dim: int = -1) -> QuantizedTensor:
    """Zero-copy views of a serialised QuantizedTensor in `buf` (1-D uint8, starting at an even
    offset of its storage; extra bytes at the end, e.g. O_DIRECT padding, are ignored)."""
    layout, dim = _layout(shape, num_bits, group_size, dim)
    data_at, scale_at, min_at, total = layout.sections()
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < total:
        raise ValueError(f"need a 1-D uint8 buffer of at least {total} bytes, got "
                         f"{buf.dtype} {tuple(buf.shape)}")
    ng, bpg = layout.num_groups, layout.bytes_per_group
    n_groups = layout.rows * ng
    data = buf[data_at:data_at + n_groups * bpg].view(*layout.lead, ng, bpg)
    scale = buf[scale_at:scale_at + 2 * n_groups].view(torch.float16).view(*layout.lead, ng)
    minimum = buf[min_at:min_at + 2 * n_groups].view(torch.float16).view(*layout.lead, ng)
    return QuantizedTensor(data=data, scale=scale, minimum=minimum, shape=tuple(int(s) for s in shape),
                           dim=dim, group_size=group_size, num_bits=num_bits)
