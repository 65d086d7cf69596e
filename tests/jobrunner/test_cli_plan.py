"""`flexjob plan` and `flexjob profile` end to end through the CLI."""
from __future__ import annotations

import json

from click.testing import CliRunner

from engine.planning.hardware import HardwareProfile, t4_flexgen
from engine.runtime.policy import Policy
from engine.planning.profile_store import profile_path
from jobrunner.cli import main

CPU_HOST = HardwareProfile(host="box", disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                           matmul_flops={"cpu": {"bfloat16": 4e11}}, cpu_attention_gbps=10.0,
                           cpu_mem_gib=23, disk_free_gib=100)
SMALL = ["--max-block-size", "64", "--compression", "off"]


def _run(args, env=None):
    result = CliRunner().invoke(main, args, env=env)
    return result.exit_code, result.output


def test_plan_prints_the_chosen_policy_and_alternatives(tmp_path):
    hw = CPU_HOST.save(tmp_path / "box.json")
    code, out = _run(["plan", "--size", "1.3b", "--hardware", str(hw), "--cpu-mem", "2", "--prompt-len", "128",
                      "--gen-len", "16", *SMALL])
    assert code == 0, out
    assert "opt-1.3b" in out and "chosen" in out and "alt 1" in out and "tokens/s" in out
    assert "--percent 0 " in out and "--gpu-batch-size" in out  # flags to paste into generate


def test_plan_json_is_a_usable_policy(tmp_path):
    hw = CPU_HOST.save(tmp_path / "box.json")
    code, out = _run(["plan", "--size", "1.3b", "--hardware", str(hw), "--cpu-mem", "2", "--prompt-len", "128",
                      "--gen-len", "16", "--json", *SMALL])
    assert code == 0, out
    data = json.loads(out)
    policy = Policy.from_dict(data["policy"])
    assert policy.block_size <= 64 and not policy.compress_weight
    assert data["tokens_per_s"] > 0 and data["peak_gib"]["cpu"] <= 2 + 1e-6
    assert data["budgets_gib"] == {"gpu": None, "cpu": 2.0, "disk": 100}
    assert data["model"] == "opt-1.3b" and data["alternatives"]


def test_plan_for_a_model_directory(tmp_path):
    from engine.model.config import preset

    model = tmp_path / "opt-test"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(preset("125m", num_layers=2, hidden_size=64).to_hf_dict()))
    hw = CPU_HOST.save(tmp_path / "box.json")
    code, out = _run(["plan", "--model", str(model), "--hardware", str(hw), "--cpu-mem", "1",
                      "--prompt-len", "16", "--gen-len", "4", "--json", *SMALL])
    assert code == 0, out
    assert json.loads(out)["policy"]["weights_cpu_percent"] == 100  # it all fits in RAM


def test_impossible_budget_is_one_line_with_the_smallest_budget(tmp_path):
    # 2 GiB of RAM cannot stage opt-30b's streamed layers (0.9 GB each, read and double-buffered).
    code, out = _run(["plan", "--size", "30b", "--hardware", "t4-flexgen", "--gpu-mem", "4", "--cpu-mem", "2",
                      *SMALL])
    assert code == 1
    assert "error: opt-30b" in out and "does not fit" in out and "the smallest budget that works: " in out
    assert "--cpu-mem 3." in out  # the staging needs ~3.5 GiB with the process's own memory
    assert "Traceback" not in out


def test_plan_needs_exactly_one_model(tmp_path):
    code, out = _run(["plan", "--hardware", "t4-flexgen"])
    assert code == 1 and "exactly one of --model" in out


def test_t4_builtin_hardware(tmp_path):
    code, out = _run(["plan", "--size", "175b", "--hardware", "t4-flexgen", "--gpu-mem", "16", "--cpu-mem", "200",
                      "--disk-mem", "1500", "--max-block-size", "256", "--json"])
    assert code == 0, out
    assert json.loads(out)["hardware"]["gpu"] == t4_flexgen().gpu_name


def test_profile_reuses_the_stored_profile_and_plan_uses_it(tmp_path):
    home, disk = tmp_path / "home", tmp_path / "disk"
    stored = CPU_HOST.replace(disk_dir=str(disk), created_at=1e12)  # "fresh" for a long time
    stored.save(profile_path(disk, home))
    env = {"FLEXJOB_HOME": str(home)}
    code, out = _run(["profile", "--disk-dir", str(disk), "--json"], env)
    assert code == 0, out
    assert HardwareProfile.from_json(out) == stored
    code, out = _run(["profile", "--disk-dir", str(disk)], env)
    assert code == 0 and "disk read" in out and "stored in" in out
    code, out = _run(["plan", "--size", "350m", "--disk-dir", str(disk), "--cpu-mem", "4", "--json", *SMALL], env)
    assert code == 0, out
    assert json.loads(out)["hardware"]["host"] == "box"


def test_profile_refresh_measures_this_host(tmp_path, monkeypatch):
    import engine.planning.profiler as profiler

    monkeypatch.setattr(profiler, "DEFAULT_DISK_BYTES", 16 * 2 ** 20)  # a short real measurement
    home, disk = tmp_path / "home", tmp_path / "disk"
    # stdout alone: a busy host adds a warning line on stderr
    result = CliRunner().invoke(main, ["profile", "--disk-dir", str(disk), "--refresh", "--json"],
                                env={"FLEXJOB_HOME": str(home)})
    assert result.exit_code == 0, result.output
    prof = HardwareProfile.from_json(result.stdout)
    assert prof.disk_read_gbps > 0 and prof.source.startswith("measured")
    assert profile_path(disk, home).is_file()


def test_plan_rounds_the_budgets_it_prints(tmp_path):
    hw = HardwareProfile(**{**CPU_HOST.to_dict(), "disk_free_gib": 71.2525}).save(tmp_path / "box.json")
    code, out = _run(["plan", "--size", "1.3b", "--hardware", str(hw), "--cpu-mem", "2", "--prompt-len", "128",
                      "--gen-len", "16", *SMALL], env={"COLUMNS": "400"})
    assert code == 0, out
    assert "budgets cpu 2 GiB, disk 71.3 GiB" in out and "71.2525" not in out


def test_make_model_with_an_unknown_size_names_the_sizes_not_a_directory(tmp_path):
    code, out = _run(["make-model", "7m", "-o", str(tmp_path / "m")])
    assert code == 1 and out.splitlines()[0].startswith("error: unknown OPT size '7m'; known: opt-125m")
    assert out.splitlines()[1] == ("hint: SIZE is one of the sizes above, such as 125m, opt-1.3b or "
                                   "llama-1b; --layers and --hidden make it smaller")
    assert not (tmp_path / "m").exists()


def test_work_with_a_zero_batch_size_is_refused_with_work_help(tmp_path):
    code, out = _run(["work", "--gpu-batch-size", "0", "--exit-when-idle", "--db", f"sqlite:///{tmp_path / 'f.db'}"])
    assert code == 1, out
    assert out.splitlines() == ["error: gpu_batch_size and num_gpu_batches must be >= 1, got 0 and 1",
                                "hint: see `flexjob work --help` for the policy flags, or omit them to let the "
                                "planner choose"]


def test_worker_log_lines_do_not_end_with_a_source_location(capsys):
    from jobrunner.cli.job_commands import _RichReporter

    reporter = _RichReporter()
    reporter.message("worker w1 started")
    reporter.close()
    err = capsys.readouterr().err
    assert "worker w1 started" in err and ".py:" not in err


def test_make_model_into_the_same_directory_removes_the_old_converted_store(tmp_path):
    from engine.model.checkpoint import WeightStore
    from engine.model.config import load_config

    home, model = tmp_path / "home", tmp_path / "m"
    env = {"FLEXJOB_HOME": str(home)}
    args = ["make-model", "125m", "--layers", "1", "--hidden", "64", "-o", str(model)]
    assert _run(args, env)[0] == 0
    old = WeightStore.open_or_convert(model, load_config(model), home).root
    assert old.is_dir()
    code, out = _run(args + ["--seed", "1"], env)
    assert code == 0, out
    assert not old.exists() and f"removed {old}: the converted weight store" in " ".join(out.split())
