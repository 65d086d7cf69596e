"""The job commands end to end through the CLI: enqueue, work, jobs, results, cancel, retry, demo."""
from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobrunner.cli import main
from tests.support.jobs import SAMPLE_PROMPTS


def cli(*args, env: dict | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def test_enqueue_work_jobs_results(tmp_path, tiny_model, prompts_file, offload_dir):
    env = {"FLEXJOB_DB": f"sqlite:///{tmp_path / 'store.db'}"}
    code, out = cli("enqueue", prompts_file, "--model", tiny_model, "--id-column", "id", "--max-new-tokens", 3,
                    "--shard-rows", 6, "--name", "smoke", env=env)
    assert code == 0 and "enqueued job 1 (smoke): 12 rows in 2 shards" in out
    code, out = cli("jobs", env=env)
    assert code == 0 and "queued" in out and "0/12" in out and "smoke" in out
    code, out = cli("work", "--exit-when-idle", "--gpu-batch-size", 4, "--offload-dir", offload_dir, env=env)
    assert code == 0, out
    assert "job 1 shard 0 attempt 1: 6 rows to do" in out
    assert "worker stopped (idle): 2 shards, 12 rows" in out
    code, out = cli("jobs", "--status", "completed", env=env)
    assert "completed" in out and "12/12" in out
    code, out = cli("results", 1, "-o", tmp_path / "out.parquet", env=env)
    assert code == 0 and f"wrote 12 rows to {tmp_path / 'out.parquet'} (length 12)" in out
    assert pq.read_table(tmp_path / "out.parquet").column("prompt").to_pylist() == SAMPLE_PROMPTS


def test_cancel_and_retry(tmp_path, tiny_model, prompts_file, offload_dir):
    db = ["--db", f"sqlite:///{tmp_path / 'f.db'}"]
    assert cli("enqueue", prompts_file, "--model", tiny_model, "--max-new-tokens", 2, *db)[0] == 0
    code, out = cli("cancel", 1, *db)
    assert code == 0 and out.strip() == "job 1 is cancelled"
    code, out = cli("cancel", 1, *db)
    assert code == 1 and "error: job 1 is already cancelled" in out
    code, out = cli("results", 1, "-o", tmp_path / "out.parquet", *db)
    assert code == 1 and "error: job 1 is cancelled with 0 of 12 rows done" in out and "--partial" in out
    code, out = cli("retry", 1, *db)
    assert code == 0 and "job 1 was cancelled; its unfinished shards are queued again" in out
    # Without policy flags the worker plans: it measures this host once (a profile in FLEXJOB_HOME).
    code, out = cli("work", "--exit-when-idle", "--offload-dir", offload_dir, *db,
                    env={"FLEXJOB_HOME": str(tmp_path / "home")})
    assert code == 0, out
    assert "measuring this machine once for the planner" in out and "policy: planned for each job's model" in out
    assert list((tmp_path / "home" / "profiles").glob("*.json"))
    code, out = cli("results", 1, "-o", tmp_path / "out.parquet", *db)
    assert code == 0 and "wrote 12 rows" in out


def test_unknown_job_is_one_line(tmp_path):
    from jobrunner.store.db import open_store

    open_store(f"sqlite:///{tmp_path / 'f.db'}").dispose()  # an empty store
    code, out = cli("results", 42, "-o", tmp_path / "o.parquet", "--db", f"sqlite:///{tmp_path / 'f.db'}")
    assert code == 1 and out.splitlines()[0] == "error: no job 42"


def test_demo_runs_the_whole_path(tmp_path, tiny_model):
    # Reuse the session's generated model (making one trains a tokenizer, ~20 s); the rest is real.
    shutil.copytree(tiny_model, tmp_path / "demo" / "model")
    code, out = cli("demo", "--dir", tmp_path / "demo")
    assert code == 0, out
    assert "enqueued job 1: 34 rows" in out
    assert "job 1 completed: 34/34 rows, 2 error rows" in out
    assert f"wrote 34 rows to {tmp_path / 'demo' / 'results.parquet'}" in out
    assert "'def fibonacci(n):' -> '" in out and "[error]" in out
    code, out = cli("demo", "--dir", tmp_path / "demo")  # again into the same directory
    assert code == 0 and "enqueued job 1: 34 rows (already there)" in out, out


@pytest.mark.slow
def test_demo_in_a_temporary_directory_makes_its_own_model():
    code, out = cli("demo")
    assert code == 0, out
    assert "making a random-weight OPT" in out and "job 1 completed" in out
    assert "was temporary and is deleted now; `flexjob demo --dir DIR` keeps the model, store and results" in out
