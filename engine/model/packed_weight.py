"""Linear-layer weights held in oneDNN's blocked layout on the CPU, packed once instead of per call.

torch's CPU matmul (oneDNN for bfloat16; `mkldnn._linear_pointwise` for float32, see
kernels.library_linear) reorders a plain [N, K] weight into the library's blocked layout inside
every call. A prefill call of thousands of rows hides that; a decode step of a few rows pays it for
every matrix, every step. On a 2-vCPU Zen4 (AVX512-BF16) a 32-row bf16 call ran at 244-290 GFLOP/s
from a plain weight and 330-379 from a packed one (float32 at 8-32 rows: 1.2-1.5x); 4096-row calls
ran alike. A decoder layer's matrix that stays in RAM is packed once, when it is placed
(engine.runtime.placed_weights).

Whether the packed call sums in the plain call's order is the library's business: kernels.pack_for_cpu
uses a packed weight only where a check (once per shape, dtype and thread count, on random rows)
finds that it gives bit for bit what the plain weight gives at the reference call size. So a
policy that streams the same matrix from disk, unpacked, computes the same outputs as one that
holds it packed in RAM.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from engine.model.kernel_shapes import rows_per_call


@dataclass(frozen=True)
class PackedWeight:
    """A [N, K] weight in oneDNN's layout (an opaque tensor that only `linear` reads)."""
    packed: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def linear(rows: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """rows [M, K] @ weight.T (+ bias), max(0, .) of it with `relu` -> [M, N], one library call."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight.packed, bias, "relu" if relu else "none", [], "")


def packable(weight: torch.Tensor) -> bool:
    """Whether `weight` can be packed here: a 2-D bfloat16 or float32 CPU matrix, on a torch build
    with oneDNN's reorder and linear."""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.dtype in (torch.bfloat16, torch.float32)
            and _library_packs(weight.dtype))


def pack(weight: torch.Tensor) -> PackedWeight:
    # The row count is a hint for the layout; every call size runs on the result, as fast (AMX, bf16:
    # 32- and 256-row calls within 2 % with a hint of 32 or 256).
    hint = rows_per_call(str(weight.dtype).removeprefix("torch."), prompt=True)
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), hint), weight.shape, weight.dtype)


@functools.cache
def _library_packs(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU have oneDNN's weight reorder and linear for `dtype` (checked
    once per process and dtype: oneDNN refuses to reorder bfloat16 weights on a CPU without
    AVX512BW/VL/DQ or AVX-NE-CONVERT, e.g. an AVX2-only one)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(16, 32).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 32, dtype=dtype), pack(w).packed, None, "none", [], "")
    except (RuntimeError, AttributeError):
        return False
    return got.shape == (2, 16)
