"""What the linear layers' call-size checks found (engine.model.kernels._agrees), remembered on disk
per machine and library build, so that a process does not rerun the checks an earlier process on
the same machine ran. Each check is one library call of up to 4096 rows on a weight's real shape:
on a 2-vCPU Xeon with AMX a fresh process spent 0.6 s of a 32-row opt-1.3b prefill on 12 of them.

File: `<flexjob home>/kernels/call-sizes-<fingerprint>.json`, the fingerprint a hash of what decides
which kernel a library call runs: torch's version and build configuration, the CPU's model and
flags, and the environment variables that steer oneDNN, MKL and OpenMP. Only CPU checks are kept.
Written under a temporary name and renamed, so a concurrent process never reads half a file; a
file that does not parse counts as empty and is rewritten.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

import torch

from engine.runtime.paths import engine_home

LIBRARY_ENV_PREFIXES = ("ONEDNN_", "DNNL_", "MKL_", "MKLDNN_", "OMP_", "KMP_", "ATEN_CPU_CAPABILITY")
# Changed whenever a check's answers may have been wrong: a file written before is not read (the
# planner's calibration multiplied matrices of one repeated value, on which every call size agreed;
# a check compared as few as 8192 outputs, where a difference can be as rare as 1e-4 of them).
CHECK_KIND = "3"

_lock = threading.Lock()
_known: dict[str, bool] = {}
_loaded = False


@functools.cache
def path() -> Path:
    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "\n".join(next((line for line in lines if line.startswith(field)), "")
                        for field in ("model name", "flags"))
    except OSError:
        pass
    # Settings that steer the libraries' kernel choice (e.g. ONEDNN_MAX_CPU_ISA) are part of it too.
    steering = repr(sorted((k, v) for k, v in os.environ.items() if k.startswith(LIBRARY_ENV_PREFIXES)))
    described = "\0".join((CHECK_KIND, torch.__version__, torch.__config__.show(), cpu, steering))
    digest = hashlib.sha256(described.encode()).hexdigest()[:16]
    return engine_home() / "kernels" / f"call-sizes-{digest}.json"


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        stored = json.loads(path().read_text())
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        _known.update({k: v for k, v in stored.items() if isinstance(v, bool)})


def recall(key: str) -> bool | None:
    """The remembered answer of the check `key`, or None."""
    with _lock:
        _load()
        return _known.get(key)


def remember(key: str, usable: bool) -> None:
    """Keep the answer of the check `key` (best effort: a folder that cannot be written keeps it
    for this process only)."""
    with _lock:
        _load()
        _known[key] = usable
        target = path()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False) as out:
                json.dump(_known, out, sort_keys=True)
            os.replace(out.name, target)
        except OSError:
            pass
