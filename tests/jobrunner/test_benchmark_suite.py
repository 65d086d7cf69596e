"""`python -m benchmarks` runs every part, each through real subprocesses, and writes its report files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CPU_PARTS = {"ram", "disk", "llama-ram", "planner", "compression", "jobrunner"}


def run_suite(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_quick_cpu_suite_writes_markdown_json_and_plots_with_a_measured_row_per_part(tmp_path):
    proc = run_suite("--suite", "cpu", "--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("suite-*.md")
    (js,) = tmp_path.glob("suite-*.json")
    assert {p.name.rsplit("-", 1)[1] for p in tmp_path.glob("suite-*.png")} == {"tokens.png", "roofline.png",
                                                                                "planner.png"}
    report = json.loads(js.read_text())
    assert set(report["parts"]) == CPU_PARTS
    for name, part in report["parts"].items():
        assert part["error"] is None and part["skipped"] is None, name
        assert any((row.get("tokens_per_s") or 0) > 0 for row in part["rows"]), name
    assert set(report["host"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    llama = report["parts"]["llama-ram"]
    assert {r["system"] for r in llama["rows"] if r["tokens_per_s"] > 0} == {"flexjob", "transformers"}
    text = md.read_text()
    assert "--quick" in text and f"dtype: {report['dtype']}" in text
    assert text.count("| system | configuration | tokens/s |") == len(CPU_PARTS)
    assert "## llama-1b-2l-h256 (random weights): All weights in RAM" in text


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip that a host without CUDA reports")
def test_gpu_suite_runs_cpu_parts_and_says_why_flexgen_is_skipped(tmp_path):
    proc = run_suite("--suite", "gpu", "--quick", "--parts", "ram,flexgen", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FlexLLMGen is skipped: no CUDA device" in proc.stdout
    (js,) = tmp_path.glob("suite-*.json")
    parts = json.loads(js.read_text())["parts"]
    assert parts["flexgen"]["rows"] == [] and parts["flexgen"]["skipped"].startswith("no CUDA device")
    assert {r["system"] for r in parts["ram"]["rows"] if r["tokens_per_s"] > 0} == {"flexjob", "transformers"}
    text = next(tmp_path.glob("suite-*.md")).read_text()
    assert "Skipped: no CUDA device" in text and "| transformers | batch 4 |" in text


def test_llama_disk_is_opt_in_for_the_cpu_suite_and_in_the_gpu_suites_default_parts():
    from benchmarks.__main__ import parse_args

    assert "llama-disk" not in parse_args(["--suite", "cpu"])[0].parts
    assert "llama-ram" in parse_args(["--suite", "cpu"])[0].parts
    assert "llama-disk" in parse_args(["--suite", "gpu"])[0].parts
    chosen, _ = parse_args(["--parts", "llama-disk"])
    assert chosen.parts == ("llama-disk",) and chosen.llama_disk.size == "llama-8b" and chosen.llama_disk_cpu_mem < 15
    shown = run_suite("--help", timeout=120).stdout
    assert "llama-disk" in shown and "opt-in for --suite cpu" in shown and "well over 30 minutes" in shown


def test_an_unknown_part_is_refused_with_the_known_ones(tmp_path):
    proc = run_suite("--parts", "ram,speed", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "unknown part 'speed'" in proc.stderr and "compression" in proc.stderr
    assert not list(tmp_path.iterdir())
