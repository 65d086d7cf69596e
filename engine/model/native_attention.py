"""Attention on the CPU in one pass per query, every sum in one fixed order (native_attention.c).

The library path (kernels._attend_group) reaches batch invariance by giving `bmm` fixed shapes:
a decode step's one query per pair becomes a batched matrix-vector product over 64-key slices,
with a mask, a softmax and a partial product per slice, each a pass over memory. This kernel reads
each pair's keys and values once, in order, and its sums cannot depend on the call's shape, so a
prefill and a decode step give a position the same numbers by construction.

It is C compiled on first use with the machine's compiler and loaded with ctypes
(engine.model.native_build). Where no compiler works, or FLEXJOB_NATIVE_ATTENTION=0, the
library path runs instead (`available()` says which), with the same invariance and other low bits.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.model import native_build
from engine.model.key_span import KeySpan

SOURCE = Path(__file__).with_name("native_attention.c")
# bfloat16 on AVX512-BF16: keys 16 at a time in vdpbf16ps dot products (native_attention_bf16.c);
# it takes over the generic kernel's bfloat16 calls where the CPU has those instructions.
BF16_SOURCE = Path(__file__).with_name("native_attention_bf16.c")
BF16_CPU_FLAGS = ("avx512_bf16", "avx512bw")
BF16_HEAD_DIMS = (32, 64, 128, 256)
LANES = 8  # the kernel's partial sums in a dot product: head_dim must be a multiple
# Queries per pair up to which a position-major cache is attended where it lies (the kernel then
# reads it in tiles of pairs; native_attention.c's tile_pairs uses the same bound).
IN_PLACE_QUERIES = 8
ENV_SWITCH = "FLEXJOB_NATIVE_ATTENTION"
_DTYPES = {torch.float32: "attend_f32", torch.bfloat16: "attend_bf16"}


def available() -> bool:
    """Whether attention on the CPU runs on the native kernel in this process."""
    return _library() is not None


def bf16_kernel() -> str | None:
    """Which kernel bfloat16 attention runs on in this process: "avx512-bf16", "generic", or None
    (no native kernel: the library path)."""
    if _library() is None:
        return None
    return "avx512-bf16" if _bf16_library() is not None else "generic"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel can take these tensors: on the CPU, float32 or bfloat16, head_dim a multiple
    of LANES, each key and value a contiguous row, keys and values laid out alike."""
    return (q.device.type == k.device.type == v.device.type == "cpu" and q.dtype in _DTYPES
            and k.dtype == v.dtype == q.dtype
            and q.shape[-1] % LANES == 0 and k.stride(-1) == 1 and v.stride() == k.stride() and available())


def attend_aligned(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, last_key: torch.Tensor | KeySpan,
                   kernel: str | None = None) -> torch.Tensor:
    """q [n, S, D]; kh, vh [n, C, D], the aligned layout (pair p's first real position at index 0);
    last_key [n, S]: the last aligned key each query attends (it attends 0 .. last_key), or the
    step's KeySpan, whose indices are made once. -> [n, S, D].
    `kernel` ("generic" or "avx512-bf16") picks one for bfloat16 (benchmarks); None: `bf16_kernel()`."""
    span = last_key if isinstance(last_key, KeySpan) else _span_of(
        torch.zeros(kh.shape[0], dtype=torch.int64), last_key)
    if span.key_count > kh.shape[1]:
        raise ValueError(f"attention over {kh.shape[1]} keys asked for key {span.key_count - 1}")
    return _run(q, kh, vh, span.offsets(0, kh.stride(0)), kh.stride(1), span, kernel)


def attend_position_major(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: torch.Tensor,
                          last_key: torch.Tensor | KeySpan, kernel: str | None = None) -> torch.Tensor:
    """q [n, S, D]; k, v [T, n, D], a cache as read from disk (pair p's first real position at
    first[p]), attended in place; last_key [n, S] counted from each pair's first, or the step's
    KeySpan (of these `first`). -> [n, S, D]. `kernel`: as for attend_aligned."""
    span = last_key if isinstance(last_key, KeySpan) else _span_of(first, last_key)
    if span.last_position >= k.shape[0]:
        raise ValueError(f"attention over {k.shape[0]} positions asked for one past them")
    return _run(q, k, v, span.offsets(k.stride(0), k.stride(1)), k.stride(0), span, kernel)


def _span_of(first: torch.Tensor, last_key: torch.Tensor) -> KeySpan:
    """The KeySpan of last keys given as they are (callers other than the engine's step)."""
    first, last_key = first.to(torch.int64).cpu(), last_key.to(torch.int64).cpu().contiguous()
    if last_key.numel() == 0:
        return KeySpan(first, last_key, 0, -1)
    if int(last_key.min()) < 0:
        raise ValueError("a query attends no key")
    return KeySpan(first, last_key, int(last_key.max()) + 1, int((last_key + first[:, None]).max()))


def _run(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, key_stride: int,
         span: KeySpan, kernel: str | None = None) -> torch.Tensor:
    """The kernel over pairs at `offsets` (elements) of keys and values, each query reading the
    keys the span gives it."""
    n, S, D = q.shape
    q, last_key = q.contiguous(), span.last_key.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if q.dtype == torch.bfloat16 and D in BF16_HEAD_DIMS and (kernel or bf16_kernel()) == "avx512-bf16":
        function = _bf16_library().attend_bf16_avx512
    else:
        function = getattr(_library(), _DTYPES[q.dtype])
    pointer = ctypes.c_void_p
    failed = function(pointer(q.data_ptr()), pointer(keys.data_ptr()), pointer(values.data_ptr()),
                      pointer(offsets.data_ptr()), key_stride, pointer(last_key.data_ptr()), pointer(out.data_ptr()),
                      n, S, D, span.key_count, torch.get_num_threads())
    if failed == 2:
        raise ValueError(f"the bfloat16 attention kernel takes head_dim {BF16_HEAD_DIMS}, not {D}")
    if failed:
        raise MemoryError("native attention could not allocate its per-thread scratch")
    return out


def write_positions(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                    at: torch.Tensor) -> bool:
    """keys[p, at[p]] = new_keys[p] and values[p, at[p]] = new_values[p] for every pair p of an
    aligned cache (keys, values [n, capacity, D] contiguous, alike; new ones [n, D]), in one parallel
    pass; False (nothing written) where the kernel cannot take them: the caller scatters instead."""
    n, capacity, d = keys.shape
    if not (available() and keys.device.type == "cpu" and keys.is_contiguous() and values.is_contiguous()
            and values.shape == keys.shape and new_keys.dtype == new_values.dtype == values.dtype == keys.dtype
            and new_keys.shape == new_values.shape == (n, d) and new_keys.device == new_values.device == keys.device):
        return False
    if n == 0:
        return True
    at = at.to(torch.int64).contiguous()
    if int(at.min()) < 0 or int(at.max()) >= capacity:
        raise ValueError(f"a new position falls outside the cache's {capacity} positions")
    new_keys, new_values = new_keys.contiguous(), new_values.contiguous()
    pointer, row_bytes = ctypes.c_void_p, d * keys.element_size()
    _library().write_positions(pointer(new_keys.data_ptr()), pointer(new_values.data_ptr()), pointer(keys.data_ptr()),
                               pointer(values.data_ptr()), pointer(at.data_ptr()), n, capacity * row_bytes, row_bytes,
                               torch.get_num_threads())
    return True


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load(SOURCE, "attention", switch=ENV_SWITCH,
                            instead="attention runs on torch's batched products")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in _DTYPES.values():
        getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.write_positions.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.write_positions.restype = None
    return lib


@functools.cache
def _bf16_library() -> ctypes.CDLL | None:
    """The AVX512-BF16 kernel, where the CPU has it and it builds (else the generic one runs)."""
    flags = native_build.cpu_flags().split()
    if _library() is None or not all(flag in flags for flag in BF16_CPU_FLAGS):
        return None
    lib = native_build.load(BF16_SOURCE, "attention-bf16", switch=ENV_SWITCH,
                            instead="bfloat16 attention runs on the generic native kernel")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.attend_bf16_avx512.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        lib.attend_bf16_avx512.restype = ctypes.c_int
    return lib
