"""Linear layers over 4-bit weights for float32 activations on the CPU, without a dequantised copy
(int4_float32.c, built with engine.model.native_build).

torch has no fast 4-bit kernel for float32 activations on an AVX2 CPU (its int4 kernel's float32
path is scalar, ~2 GFLOP/s), so a float32 job dequantised every 4-bit matrix before its layer ran:
on two AVX2 cores that was ~1.3 s of a 32-row opt-1.3b decode step and a float32 copy of two
layers in memory. This kernel unpacks each weight once per call into a small buffer and runs
every row of the call over it with FMAs, reading the weights as they are stored
(engine.runtime.compression's layout: a matrix held in RAM or read from disk is used in place).

A row's numbers do not depend on the call (the C file says how), so generated tokens take this
kernel at any number of rows without padding. Its low bits are its own, not the library's on the
dequantised matrix: prompt tokens multiply a dequantised copy on the library (a prefill's
thousands of rows run faster on MKL's sgemm), which engine.model.kernels.linear keeps apart by
token role, as it does for the other 4-bit kernel (engine.model.int4_matmul).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.model import native_build
from engine.runtime.compression import QuantizedTensor

SOURCE = Path(__file__).with_name("int4_float32.c")
COLUMNS_PER_PANEL = 4  # the kernel's COLS: output features a thread takes at a time
MAX_GROUP = 512  # the kernel's BLOCK_K: a group must fit in one dequantised block
ENV_SWITCH = "FLEXJOB_NATIVE_INT4"
FLAGS = (*native_build.BASE_FLAGS, "-ffp-contract=off")  # dequantisation is a multiply then an add, as torch's


def available() -> bool:
    """Whether 4-bit matrices with float32 activations run on the native kernel in this process."""
    return _library() is not None


def fits(shape: tuple[int, ...], num_bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a stored [out, in] matrix can run on the kernel: 4 bits grouped along `in`, float32
    on the CPU, a group of a multiple of 16 inputs (two 8-lane halves per group of bytes) that
    divides `in`, `out` a multiple of the panel width."""
    return (num_bits == 4 and len(shape) == 2 and dtype == torch.float32 and device.type == "cpu"
            and group_size % 16 == 0 and group_size <= MAX_GROUP and shape[1] % group_size == 0
            and shape[0] % COLUMNS_PER_PANEL == 0 and available())


def linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for float32 x [..., in] and a 4-bit W [out, in] -> [..., out], each row's
    bits independent of the other rows of the call."""
    return native_build.quantized_linear(_library().int4_linear_f32, x, weight, bias, torch.float32)


def dequantize(weight: QuantizedTensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 [out, in] matrix, bit for bit compression.dequantize(weight, float32), in one
    pass over memory (torch's takes three: unpack, scale, shift); `out` is a reused buffer."""
    return native_build.quantized_dequantise(_library().int4_dequantise_f32, weight, out, torch.float32)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = native_build.load(SOURCE, "int4-float32", switch=ENV_SWITCH, flags=FLAGS,
                            instead="4-bit matrices are dequantised before their layer runs")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.int4_linear_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.int4_linear_f32.restype = ctypes.c_int
    lib.int4_dequantise_f32.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.int4_dequantise_f32.restype = None
    return lib
