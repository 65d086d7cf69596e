"""The engine's process-wide settings reach torch: they are environment variables that torch reads
once, when it loads (OpenMP's spin count) or first allocates (huge pages), so importing the engine
sets them before torch is imported, and a value the user set wins."""
from __future__ import annotations

import os
import subprocess
import sys

# Whether torch was loaded when the engine package had set them, then the values torch saw.
SHOW = ("import sys, os, engine; loaded_before = 'torch' in sys.modules; import engine.runtime.engine; "
        "print(os.environ['GOMP_SPINCOUNT'], os.environ['THP_MEM_ALLOC_ENABLE'], loaded_before)")


def run(env: dict) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_importing_the_engine_sets_a_short_openmp_spin_and_huge_pages_before_torch_loads():
    assert run({}) == ["10000", "1", "False"]


def test_a_value_the_user_set_is_kept():
    assert run({"GOMP_SPINCOUNT": "0", "THP_MEM_ALLOC_ENABLE": "0"}) == ["0", "0", "False"]
