"""The examples run and print what they promise."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_flexgen_tutorial_policies_prints_every_policy(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "flexgen_tutorial_policies.py"), "--model",
                           str(tiny_model), "--gen-len", "2", "--gpu-batch-size", "2", "--offload-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()[1:]
    assert len(lines) == 5
    for line in lines:
        percent, numbers = line[:22].strip(), line[22:].split()
        assert len(percent.split()) == 6 and float(numbers[0]) > 0 and float(numbers[1]) > 0
