"""`python -m benchmarks` runs every part, each through real subprocesses, and writes its report files."""
from __future__ import annotations

import json
import os
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
    # The disk part runs the planner's pick and the hand-written placement; its roofline splits what
    # each run read into its weights (every disk-tier weight charged once per step: the run read at
    # least that much) and the rest, its KV cache.
    planned, hand = [r for r in report["parts"]["disk"]["rows"] if r["system"] == "flexjob"]
    assert "planner's pick" in planned["config"] and hand["config"].startswith("4x1 0 10 0 0 100 0")
    assert hand["weights_disk_bytes"] > 0 and hand["cache_read_bytes"] > 0
    for ours in (planned, hand):
        steps = ours["steps"]
        assert ours["weights_read_bytes"] == ours["weights_disk_bytes"] * steps
        assert ours["weights_read_bytes"] + ours["cache_read_bytes"] == ours["disk_read_bytes"]
        assert 0 < ours["roofline_s"] and 0 < ours["roofline_fraction"]
        assert ours["roofline_disk_bound_steps"] <= steps
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
    assert parse_args(["--parts", "planner", "--planner-repeats", "3"])[0].planner_repeats == 3
    chosen, _ = parse_args(["--parts", "llama-disk"])
    assert chosen.parts == ("llama-disk",) and chosen.llama_disk.size == "llama-8b" and chosen.llama_disk_cpu_mem < 15
    shown = run_suite("--help", timeout=120).stdout
    assert "llama-disk" in shown and "opt-in for --suite cpu" in shown and "well over 30 minutes" in shown


def test_an_unknown_part_is_refused_with_the_known_ones(tmp_path):
    proc = run_suite("--parts", "ram,speed", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "unknown part 'speed'" in proc.stderr and "compression" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_the_over_capacity_memory_limit_holds_a_child_to_it(tmp_path):
    """A child in the benchmark's memory cgroup is killed when it touches more than the limit and
    runs when it stays under it; the cgroup's peak usage counts the file pages it read too."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_cgroup

    why_not = memory_cgroup.available()
    if why_not:
        pytest.skip(why_not)
    data = tmp_path / "data.bin"
    with open(data, "wb") as f:
        f.write(b"\1" * (96 << 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # read back from disk, by the child
    # Every page of the file through a mapping: file pages only, no copy in the process's own memory.
    read_it = (f"import mmap; f = open({str(data)!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
               "print(sum(m[i] for i in range(0, len(m), 4096)))")
    touch = "x = bytearray({mib} << 20); print('touched')"
    for code, limit, survives in ((touch.format(mib=400), 0.25, False), (touch.format(mib=64), 0.25, True),
                                  (read_it, 0.5, True)):
        with memory_cgroup.memory_limit(limit, f"flexjob-test-{limit}") as (enter, stats):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=enter)
            usage = stats()
        assert (proc.returncode == 0) == survives, (code, proc.returncode, proc.stderr[-300:])
        assert usage["cgroup_peak_bytes"] is None or usage["cgroup_peak_bytes"] <= limit * 2**30
        if code == read_it:  # the read file's pages were charged to the cgroup with the process
            assert usage["cgroup_peak_bytes"] is None or usage["cgroup_peak_bytes"] > 96 << 20
