"""Attention on the CPU in one pass per query, every sum in one fixed order (native_attention.c).

The library path (kernels._attend_group) reaches batch invariance by giving `bmm` fixed shapes:
a decode step's one query per pair becomes a batched matrix-vector product over 64-key slices,
with a mask, a softmax and a partial product per slice, each a pass over memory. This kernel reads
each pair's keys and values once, in order, and its sums cannot depend on the call's shape, so a
prefill and a decode step give a position the same numbers by construction.

It is C compiled on first use with the machine's compiler (`cc`, OpenMP, the host's vector
instructions) into `<flexjob home>/kernels/` and loaded with ctypes; torch's headers are not needed,
so the build takes about a second. Where no compiler works, or FLEXJOB_NATIVE_ATTENTION=0, the
library path runs instead (`available()` says which), with the same invariance and other low bits.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.runtime.paths import engine_home

SOURCE = Path(__file__).with_name("native_attention.c")
LANES = 8  # the kernel's partial sums in a dot product: head_dim must be a multiple
ENV_SWITCH = "FLEXJOB_NATIVE_ATTENTION"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-fast-math")
_DTYPES = {torch.float32: "attend_f32", torch.bfloat16: "attend_bf16"}
log = logging.getLogger(__name__)


def available() -> bool:
    """Whether attention on the CPU runs on the native kernel in this process."""
    return _library() is not None


def supports(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> bool:
    """Whether `attend` can take these tensors: CPU, float32 or bfloat16, head_dim a multiple of LANES,
    keys and values with contiguous rows and the same stride between pairs."""
    return (q.device.type == "cpu" and q.dtype in _DTYPES and kh.dtype == vh.dtype == q.dtype
            and q.shape[-1] % LANES == 0 and kh.stride(2) == 1 and kh.stride(1) == q.shape[-1]
            and vh.stride() == kh.stride() and available())


def attend(q: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, last_key: torch.Tensor) -> torch.Tensor:
    """q [n, S, D]; kh, vh [n, C, D] (the aligned layout, one stride between pairs); last_key [n, S]:
    the last aligned key each query attends (it attends 0 .. last_key). Returns [n, S, D]."""
    n, S, D = q.shape
    q = q.contiguous()
    last_key = last_key.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    keys = int(last_key.max()) + 1
    if int(last_key.min()) < 0 or keys > kh.shape[1]:
        raise ValueError(f"attention over {kh.shape[1]} keys asked for key {keys - 1}")
    kernel = getattr(_library(), _DTYPES[q.dtype])
    kernel(ctypes.c_void_p(q.data_ptr()), ctypes.c_void_p(kh.data_ptr()), ctypes.c_void_p(vh.data_ptr()),
           ctypes.c_void_p(last_key.data_ptr()), ctypes.c_void_p(out.data_ptr()), n, S, D, kh.stride(0), keys,
           torch.get_num_threads())
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_built()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native attention unavailable (%s); attention runs on torch's batched products", exc)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in _DTYPES.values():
        getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_int]
        getattr(lib, name).restype = None
    return lib


def _built() -> Path:
    """The shared library for this source, compiler and machine, built once into the kernels folder
    (written under a temporary name and renamed, so concurrent workers never load half a file)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_flags()])
                            .encode()).hexdigest()[:16]
    folder = engine_home() / "kernels"
    target = folder / f"attention-{digest}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built, target)
    return target


def _cpu_flags() -> str:
    """The CPU's feature flags (-march=native builds for them; another CPU gets its own build)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""
