"""Which device computes and in which dtype: the compute device and the dtype names the engine knows.

Compute dtype defaults: float16 on CUDA; on the CPU bfloat16 where the CPU has native bf16 matmul
(AVX512-BF16/AMX: 2-4x faster than float32), else float32 (bf16 is emulated and 7x slower on
AVX2-only CPUs).

torch is imported inside the functions: the dtype names are read by the command line, whose
commands that never compute (status, enqueue's checks) should not pay for loading torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import EngineInputError

if TYPE_CHECKING:
    import torch

# The compute dtypes the engine runs in, by name, with their bytes per element.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = tuple(DTYPE_BYTES)


def torch_dtype(name: str) -> torch.dtype:
    """torch.float32 for "float32"."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" for torch.float32: the name jobs, profiles and the CLI use."""
    return str(dtype).removeprefix("torch.")


def default_device() -> torch.device:
    import torch

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
            return torch_dtype("float16")
        return torch_dtype("bfloat16" if cpu_has_fast_bfloat16() else "float32")
    if name not in DTYPE_NAMES:
        raise EngineInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}",
                               parameter="dtype")
    return torch_dtype(name)


def default_dtype_name() -> str:
    """The compute dtype this machine runs fastest (what a job records when none is given)."""
    return dtype_name(resolve_dtype(None, default_device()))
