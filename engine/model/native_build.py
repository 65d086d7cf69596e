"""C kernels built on first use with the machine's compiler and loaded with ctypes.

A kernel is one C source beside this file, compiled with `cc` (OpenMP, -march=native: the host's
vector instructions) into `<flexjob home>/kernels/<stem>-<digest>.so`, where the digest covers
the source, the compiler, the flags and the CPU's feature flags (another CPU gets its own build).
torch's headers are not needed, so a build takes about a second.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.runtime.compression import QuantizedTensor
from engine.runtime.paths import engine_home

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-fast-math")
log = logging.getLogger(__name__)


def load(source: Path, stem: str, *, switch: str, instead: str,
         flags: tuple[str, ...] = BASE_FLAGS) -> ctypes.CDLL | None:
    """The kernel's library, built if needed; None where the environment variable `switch` is "0" or
    no build works (logged once, with `instead`: what runs in its place)."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(built(source, stem, flags)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s unavailable (%s); %s", stem, exc, instead)
        return None


def built(source: Path, stem: str, flags: tuple[str, ...] = BASE_FLAGS) -> Path:
    """The shared library for `source`, built once into the kernels folder (written under a
    temporary name and renamed, so concurrent workers never load half a file). Raises OSError
    when no compiler works."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([source.read_text(), compiler, version, *flags, cpu_flags()])
                            .encode()).hexdigest()[:16]
    folder = engine_home() / "kernels"
    target = folder / f"{stem}-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built_here = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, str(source), "-o", str(built_here), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built_here, target)
    return target


def cpu_flags() -> str:
    """The CPU's feature flags line of /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def quantized_linear(function, x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None,
                     dtype: torch.dtype) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out] in `dtype` through a 4-bit kernel's C `function` of
    the shared signature (x, codes, minimum, step, bias, out, M, N, K, group, threads), which returns
    nonzero when it could not allocate its scratch."""
    n, k = weight.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=dtype)
    if out.numel() == 0:
        return out.view(*lead, n)
    stored = _stored(weight)  # kept alive until the call returns
    bias = None if bias is None else bias.to(dtype).contiguous()
    failed = function(_pointer(rows), *map(_pointer, stored), None if bias is None else _pointer(bias), _pointer(out),
                      rows.shape[0], n, k, weight.group_size, torch.get_num_threads())
    if failed:
        raise MemoryError(f"the 4-bit {str(dtype).removeprefix('torch.')} kernel could not allocate its scratch")
    return out.view(*lead, n)


def quantized_dequantise(function, weight: QuantizedTensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """W as a `dtype` [out, in] matrix through a kernel's C `function` (codes, minimum, step, out, N,
    K, group, threads); `out` is a reused buffer."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=dtype) if out is None else out
    stored = _stored(weight)  # kept alive until the call returns
    function(*map(_pointer, stored), _pointer(out), n, k, weight.group_size, torch.get_num_threads())
    return out


def _stored(weight: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes, minimums and steps, the kernels' first three operands, each contiguous (the stored
    layout's sections are; a copy is made only for a view that is not)."""
    return weight.data.contiguous(), weight.minimum.contiguous(), weight.scale.contiguous()


def _pointer(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())
