"""Bad input and budgets: one clear line each, non-zero exit, no traceback unless --debug."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engine.runtime.engine import Engine
from engine.errors import BudgetError
from engine.runtime.policy import Policy

FLEXJOB = [sys.executable, "-m", "jobrunner.cli"]


def flexjob(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(FLEXJOB + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    error_lines = [l for l in proc.stderr.splitlines() if l.lower().startswith("error")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in error_lines[0], proc.stderr


def test_missing_model_dir(tmp_path):
    assert_one_line_error(flexjob("generate", "--model", tmp_path / "nope", "--prompt", "x"),
                          "does not exist", "nope")


def test_dir_without_config(tmp_path):
    assert_one_line_error(flexjob("generate", "--model", tmp_path, "--prompt", "x"), "no config.json")


def test_non_opt_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert_one_line_error(flexjob("generate", "--model", tmp_path, "--prompt", "x"), "llama", "OPT")


def test_truncated_safetensors(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    proc = flexjob("generate", "--model", broken, "--prompt", "x", "--offload-dir", tmp_path / "o",
                   "--percent", "0", "100", "0", "100", "0", "100")  # a placement given: no hardware profile
    assert_one_line_error(proc, "model.safetensors")


@pytest.mark.parametrize("percent,needle", [(["100", "0", "100"], "6 arguments"),
                                            (["60", "50", "100", "0", "100", "0"], "sum to 110")])
def test_bad_percent(tiny_model, tmp_path, percent, needle):
    proc = flexjob("generate", "--model", tiny_model, "--prompt", "x", "--offload-dir", tmp_path / "o",
                   "--percent", *percent)
    assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_too_long(tiny_model, tmp_path):
    proc = flexjob("generate", "--model", tiny_model, "--prompt", "word " * 3000, "--offload-dir", tmp_path / "o")
    assert_one_line_error(proc, "exceeds the model's 2048 positions")


def test_debug_shows_traceback(tmp_path):
    proc = flexjob("--debug", "generate", "--model", tmp_path / "nope", "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_generate_prints_text_and_summary(tiny_model, tmp_path):
    proc = flexjob("generate", "--model", tiny_model, "--prompt", "def f(x):", "--max-new-tokens", "4",
                   "--offload-dir", tmp_path / "o", "--percent", "0", "50", "0", "50", "0", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f(x):")
    assert "tokens/s" in proc.stdout and "peak RSS" in proc.stdout and "disk" in proc.stdout


def test_too_small_budget_refused_before_loading(tiny_model, tmp_path):
    """Refused with the numbers, naming the engine's own parameter; the fields say which budget."""
    with pytest.raises(BudgetError, match=r"needs .* GiB of CPU memory .* cpu_mem_gib allows 0.01 GiB") as err:
        Engine(tiny_model, Policy(), dtype="float32", offload_dir=tmp_path / "o", cpu_mem_gib=0.01)
    assert (err.value.tier, err.value.allowed_gib, err.value.parameter) == ("cpu", 0.01, "cpu_mem_gib")
    assert err.value.needed_gib > 0.01 and "--" not in str(err.value) + err.value.hint


def test_block_too_big_for_budget_refused(tiny_model, tmp_path):
    """The weights fit, but a block's KV cache in RAM does not: refused before generating."""
    from engine.runtime.rows import GenerationParams, RowInput
    import psutil
    budget = psutil.Process().memory_info().rss / 2**30 + 0.25
    with Engine(tiny_model, Policy(gpu_batch_size=64, num_gpu_batches=8), dtype="float32",
                offload_dir=tmp_path / "o", cpu_mem_gib=budget) as engine:
        rows = [RowInput(row_id=i, prompt_ids=tuple(range(4, 1004))) for i in range(2)]
        with pytest.raises(BudgetError, match="kv cache"):
            engine.generate(rows, GenerationParams(max_new_tokens=1000))


RSS_SCRIPT = """
import json, sys
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput
model, offload, budget, percents = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
policy = Policy.from_percents(percents, gpu_batch_size=4, num_gpu_batches=2)
with Engine(model, policy, dtype="float32", offload_dir=offload, cpu_mem_gib=budget) as e:
    rows = [RowInput(row_id=i, prompt_ids=tuple(range(10, 60 + i))) for i in range(8)]
    e.generate(rows, GenerationParams(max_new_tokens=8))
    print(json.dumps({"peak_rss": e.stats.peak_rss_bytes, "read": e.stats.blocks[0].transfers.get("disk_read", (0, 0))[0]}))
"""


@pytest.fixture(scope="module")
def converted_125m(tmp_path_factory):
    """opt-125m with its weight store converted (conversion reads the checkpoint, which is not part of
    a run) and the RSS of a bare process that imported the engine, GiB."""
    from engine.model.config import preset
    from engine.model.synthetic import make_model
    model = make_model(preset("125m"), tmp_path_factory.mktemp("m") / "opt-125m")
    offload = tmp_path_factory.mktemp("o")
    Engine(model, Policy(), dtype="float32", offload_dir=offload).close()
    probe = subprocess.run([sys.executable, "-c", "import engine.runtime.engine, transformers, psutil; "
                            "print(psutil.Process().memory_info().rss)"], capture_output=True, text=True)
    return model, offload, int(probe.stdout.strip()) / 2**30


def _run_under_budget(model, offload, budget: float, percents) -> dict:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(model), str(offload), str(budget),
                           json.dumps(percents)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("peak RSS GiB", out["peak_rss"] / 2**30, "budget", budget)
    assert out["peak_rss"] <= budget * 2**30, (out["peak_rss"] / 2**30, budget)
    return out


def test_disk_policy_peak_rss_under_budget(converted_125m):
    """opt-125m (float32 weights ~660 MB with the untied head copy) runs from disk with ~460 MiB
    beyond the bare process, so the weights cannot be resident, and the measured peak RSS of the
    whole process stays within --cpu-mem."""
    model, offload, baseline = converted_125m
    out = _run_under_budget(model, offload, baseline + 0.45, (0, 0, 0, 0, 100, 0))
    assert out["read"] > 100e6  # really streamed from disk


def test_resident_weights_are_counted_once(converted_125m):
    """Weights held in RAM are part of the process's RSS once loaded: the per-block check must not
    count them again (it did: an all-RAM policy needing ~0.7 GiB was refused under a 0.9 GiB margin)."""
    model, offload, baseline = converted_125m
    out = _run_under_budget(model, offload, baseline + 0.9, (0, 100, 0, 100, 100, 0))
    assert out["read"] == 0  # all weights resident


def test_generate_without_percent_uses_the_planner(tiny_model, tmp_path):
    env = {**os.environ, "FLEXJOB_HOME": str(tmp_path / "home")}
    proc = subprocess.run(FLEXJOB + ["generate", "--model", str(tiny_model), "--prompt", "def f(x):", "--prompt",
                                     "import os", "--max-new-tokens", "4", "--cpu-mem", "4"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    planned = [l for l in proc.stderr.splitlines() if l.startswith("planner:")]
    assert planned and "predicted" in planned[0]
    # The policy the planner printed is the one that ran, and its block fits the two prompts.
    policy = planned[0].split()[1]
    assert f"policy: {policy}" in proc.stdout and policy.startswith(("1x", "2x"))
    assert list((tmp_path / "home").rglob("*.json"))  # the measured profile was stored for reuse
