"""A linear layer's call-size checks are remembered per machine (engine.model.size_checks): a second
process reads the first one's answers from the file instead of checking again, and a damaged
file is ignored and rewritten. Real processes, a real file under $FLEXJOB_HOME."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, torch
from engine.model import kernels, size_checks
gen = torch.Generator().manual_seed(0)
weight, bias = torch.randn(384, 256, generator=gen), torch.randn(384, generator=gen)
answers = {size: kernels._agrees(size, 32, weight, bias, False) for size in (8, 16, 64)}
print(json.dumps({"answers": answers, "file": str(size_checks.path())}))
"""


def _child(home: Path, **settings: str) -> dict:
    env = dict(os.environ, FLEXJOB_HOME=str(home), **settings)
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_takes_the_first_ones_answers_from_the_file(tmp_path):
    first = _child(tmp_path)
    stored = json.loads(Path(first["file"]).read_text())
    assert len(stored) == 3 and all(isinstance(v, bool) for v in stored.values())
    # Flip every stored answer: a process that reads the file returns the flipped ones, which a
    # check of its own would not give.
    Path(first["file"]).write_text(json.dumps({k: not v for k, v in stored.items()}))
    second = _child(tmp_path)
    assert second["answers"] == {size: not usable for size, usable in first["answers"].items()}


def test_a_damaged_file_is_ignored_and_rewritten(tmp_path):
    first = _child(tmp_path)
    Path(first["file"]).write_text("{not json")
    assert _child(tmp_path)["answers"] == first["answers"]
    assert len(json.loads(Path(first["file"]).read_text())) == 3


def test_a_setting_that_steers_the_library_gets_a_file_of_its_own(tmp_path):
    plain = _child(tmp_path)["file"]
    steered = _child(tmp_path, ONEDNN_MAX_CPU_ISA="AVX2")["file"]
    assert steered != plain and Path(steered).exists() and Path(plain).exists()
