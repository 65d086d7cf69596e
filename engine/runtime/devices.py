"""Which device computes and in which dtype: the compute device and the dtype names the engine knows.

Compute dtype defaults: float16 on CUDA; on the CPU bfloat16 where the CPU has native bf16 matmul
(AVX512-BF16/AMX: 2-4x faster than float32), else float32 (bf16 is emulated and 7x slower on
AVX2-only CPUs).
"""
from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import EngineInputError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)
DTYPE_BYTES: dict[str, int] = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the name jobs, profiles and the CLI use."""
    return str(dtype).removeprefix("torch.")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_fast_bfloat16() -> bool:
    """bf16 matmul is fast only with AVX512-BF16 or AMX; elsewhere oneDNN emulates it (7x slower
    than float32 on an AVX2-only EPYC), so float32 is the better default there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The dtype called `name`, or (None) the one this device runs fastest."""
    if name is None:
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32
    if name not in DTYPES:
        raise EngineInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def default_dtype_name() -> str:
    """The compute dtype this machine runs fastest (what a job records when none is given)."""
    return dtype_name(resolve_dtype(None, default_device()))
