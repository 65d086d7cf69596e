"""Which kernel multiplies a 4-bit matrix without a dequantised copy per step, by compute dtype and
CPU, and the dequantised copy that prompt tokens multiply on the library instead.

- bfloat16 on a CPU with AVX512-BF16 (on AMX tiles where it has them): engine.model.int4_bfloat16,
  on the stored bytes;
- bfloat16 elsewhere: torch's int4 kernel (engine.model.int4_matmul), on a repacked copy;
- float32 on an AVX2 CPU: engine.model.int4_float32, on the stored bytes.
Each gives a row the same bits in every call, so generated tokens run on it at any number of rows.
"""
from __future__ import annotations

from typing import Callable

import torch

from engine.model import int4_bfloat16, int4_float32, int4_matmul
from engine.runtime.compression import QuantizedTensor

FourBitWeight = int4_matmul.Int4Weight | QuantizedTensor
KERNELS = (int4_bfloat16, int4_matmul, int4_float32)  # in order of preference: the first that fits
READ_IN_PLACE = (int4_bfloat16, int4_float32)  # the kernels that read the stored layout as it is


def four_bit_kernel(shape: tuple[int, ...], num_bits: int, group_size: int, dtype: torch.dtype,
                    device: torch.device):
    """The module whose kernel multiplies a stored 4-bit [out, in] matrix, or None: the matrix is
    dequantised before its layer runs."""
    return next((module for module in KERNELS if module.fits(shape, num_bits, group_size, dtype, device)), None)


def prompt_copy_bytes(kernel, numel: int) -> int:
    """Bytes of the reused buffers that prompt tokens' dequantised copy of a 4-bit matrix of `numel`
    weights takes with `kernel` (`dequantized`): float32, bfloat16, or bfloat16 plus uint8 codes."""
    return numel * {int4_float32: 4, int4_bfloat16: 2}.get(kernel, 2 + 1)


def multiply(rows: torch.Tensor, weight: FourBitWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """rows [M, K] @ weight.T (+ bias) on the weight's kernel."""
    if isinstance(weight, int4_matmul.Int4Weight):
        return int4_matmul.linear(rows, weight, bias)
    kernel = int4_float32 if rows.dtype == torch.float32 else int4_bfloat16
    return kernel.linear(rows, weight, bias)


def dequantized(weight: FourBitWeight, dtype: torch.dtype,
                buffer: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor]) -> torch.Tensor:
    """The weight as a `dtype` [out, in] matrix with its kernel's weights, in buffers that
    `buffer(slot, shape, dtype)` lends (reused from call to call)."""
    n, k = weight.shape
    if isinstance(weight, int4_matmul.Int4Weight):
        return int4_matmul.dequantize(weight, out=buffer("dequantised", (n, k), torch.bfloat16),
                                      codes=buffer("codes", (n, k), torch.uint8))
    kernel = int4_float32 if dtype == torch.float32 else int4_bfloat16
    return kernel.dequantize(weight, out=buffer("dequantised", (n, k), dtype))
