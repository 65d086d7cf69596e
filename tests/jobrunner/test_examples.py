"""The examples run (`--quick`, on the two-layer test model), print what they promise and write a
JSON with every point and a PNG chart."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, model: Path, tmp_path: Path) -> tuple[str, dict]:
    """Run examples/<name>.py --quick; its stdout and the JSON it wrote (the PNG beside it checked)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--quick", "--model", str(model),
                           "--offload-dir", str(tmp_path / "offload"), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    jsons = list(out.glob("*.json"))
    assert len(jsons) == 1
    assert jsons[0].with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    return proc.stdout, json.loads(jsons[0].read_text())


@pytest.mark.slow
def test_flexgen_tutorial_policies_prints_and_charts_every_policy(tiny_model, tmp_path):
    stdout, data = run_example("flexgen_tutorial_policies", tiny_model, tmp_path)
    lines = stdout.splitlines()[1:6]
    for line in lines:
        percent, numbers = line[:22].strip(), line[22:].split()
        assert len(percent.split()) == 6 and float(numbers[0]) > 0 and float(numbers[1]) > 0
    assert [r["percent"] for r in data["policies"]] == [line[:22].strip() for line in lines]
    for r in data["policies"]:
        assert r["ok"] and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
        # the engine's own peak (sampled) never exceeds the kernel's high-water mark by more than rounding
        assert r["engine_peak_rss_gib"] <= r["peak_rss_gib"] + 0.01


@pytest.mark.slow
def test_cpu_mem_cap_example_runs_three_ways_under_the_cap(tiny_model, tmp_path):
    _, data = run_example("opt67b_cpu_mem_cap", tiny_model, tmp_path)
    hf, whole, streamed = data["runs"]
    assert hf["run"].startswith("transformers") and hf["ok"] and hf["killed"] is None   # a tiny model fits
    assert whole["percent"] == "100 0 100 0 100 0"
    assert streamed["ok"] and streamed["tokens_per_s"] > 0
    assert 0 < streamed["peak_rss_gib"] < data["cap_gib"]
    assert streamed["weights_gib"]["disk"] > 0


@pytest.mark.slow
def test_weights_ram_sweep_has_every_share_and_the_planners_pick(tiny_model, tmp_path):
    _, data = run_example("weights_ram_sweep", tiny_model, tmp_path)
    assert [p["share"] for p in data["points"]] == [0, 25, 50, 75, 100]
    for p in data["points"]:
        assert p["ok"] and p["tokens_per_s"] > 0 and p["peak_rss_gib"] > 0
    disk = [p["weights_gib"]["disk"] for p in data["points"]]
    assert disk == sorted(disk, reverse=True) and disk[0] > 0 and disk[-1] == 0
    pick = data["planner"]
    assert pick["ok"] and 0 <= pick["weights_ram_percent"] <= 100 and pick["run"]["ok"]
