"""Linear layers over 4-bit weights for bfloat16 activations on a CPU with AVX512-BF16, without a
dequantised copy (int4_bfloat16.c, built with engine.model.native_build): on AMX tiles where the CPU
has them, on AVX512-BF16 dot products elsewhere (Zen4).

torch's fused int4 CPU kernel (engine.model.int4_matmul) computes in float32 FMAs: on a 2-vCPU Xeon
with AMX a 16-row opt-1.3b decode step ran at 0.61x the speed of bfloat16 weights, which AMX
multiplies several times faster (on Zen4: 0.51x). This kernel dequantises each weight once per
call, by table lookup, into a panel in L1 and multiplies it there, reading the weights as they are
stored (engine.runtime.compression's layout: a matrix held in RAM or read from disk is used in
place, with no repacked copy).

A row's numbers do not depend on the call (the C file says how), so generated tokens take this
kernel at any number of rows without padding. Prompt tokens multiply a dequantised copy with the
same weights on the library (a prefill's thousands of rows run faster there); engine.model.kernels
keeps the two roles apart. The two paths give different bits (their sums run in different
orders): a process uses one, the first of PATHS.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from engine.model import native_build
from engine.runtime.compression import QuantizedTensor

SOURCE = Path(__file__).with_name("int4_bfloat16.c")
FEATURES_PER_PANEL = 32  # the kernel's FEATURES: two 16-row weight tiles
MAX_GROUP = 256  # the kernel's BLOCK_K: a group must fit in one dequantised block
ENV_SWITCH = "FLEXJOB_NATIVE_INT4"
FLAGS = (*native_build.BASE_FLAGS, "-ffp-contract=off")  # a weight is a multiply then an add
REQUIRED_CPU_FLAGS = ("avx512_bf16", "avx512bw", "avx512vl")
AMX_CPU_FLAGS = ("amx_tile", "amx_bf16")


def available() -> bool:
    """Whether 4-bit matrices with bfloat16 activations run on this kernel in this process."""
    return _library() is not None


def paths() -> tuple[str, ...]:
    """The kernel's paths this process can run, the one it uses first: "amx" and "dot", or "dot"."""
    return () if _library() is None else ("amx", "dot") if _amx() else ("dot",)


def fits(shape: tuple[int, ...], num_bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a stored [out, in] matrix can run on the kernel: 4 bits grouped along `in`, bfloat16
    on an AVX512-BF16 CPU, a group of a multiple of 32 inputs (one tile row) that divides `in`, `out` a
    multiple of the panel width."""
    return (num_bits == 4 and len(shape) == 2 and dtype == torch.bfloat16 and device.type == "cpu"
            and group_size % 32 == 0 and group_size <= MAX_GROUP and shape[1] % group_size == 0
            and shape[0] % FEATURES_PER_PANEL == 0 and available())


def linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None, *,
           path: str | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) for bfloat16 x [..., in] and a 4-bit W [out, in] -> [..., out], each row's
    bits independent of the other rows of the call; on `path` (one of `paths()`; the first if None)."""
    lib = _library()
    function = lib.int4_linear_bf16 if (path or paths()[0]) == "amx" else lib.int4_linear_bf16_dot
    return native_build.quantized_linear(function, x, weight, bias, torch.bfloat16)


def dequantize(weight: QuantizedTensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The bfloat16 [out, in] matrix of the kernel's weights (each code * step + minimum in float32,
    rounded once), in one pass over memory; `out` is a reused buffer."""
    return native_build.quantized_dequantise(_library().int4_dequantise_bf16, weight, out, torch.bfloat16)


@functools.cache
def _library() -> ctypes.CDLL | None:
    flags = native_build.cpu_flags().split()
    if not all(flag in flags for flag in REQUIRED_CPU_FLAGS):
        return None  # no AVX512-BF16: torch's int4 kernel (engine.model.int4_matmul) runs instead
    lib = native_build.load(SOURCE, "int4-bfloat16", switch=ENV_SWITCH, flags=FLAGS,
                            instead="torch's int4 kernel multiplies 4-bit matrices in bfloat16")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in ("int4_linear_bf16", "int4_linear_bf16_dot"):
        if hasattr(lib, name):  # the AMX path is built only for a CPU with AMX
            getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
            getattr(lib, name).restype = ctypes.c_int
    lib.int4_dequantise_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.int4_dequantise_bf16.restype = None
    return lib


@functools.cache
def _amx() -> bool:
    """Whether the AMX path was built and Linux grants this process the AMX tile state it needs."""
    lib, flags = _library(), native_build.cpu_flags().split()
    return (lib is not None and all(flag in flags for flag in AMX_CPU_FLAGS) and lib.int4_bf16_has_amx() == 1
            and lib.int4_bf16_enable() == 0)
