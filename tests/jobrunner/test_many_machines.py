"""Workers on "different machines" share nothing but the PostgreSQL store: each runs in its own
working directory with its own FLEXJOB_HOME and disk tier, the input file is gone once enqueued,
and `flexjob results` runs from a third place. Only the model directory is at one path, as models
are deployed. The merged output equals a single-process run's."""
from __future__ import annotations

import os
import subprocess

import pytest

from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts

PARAMS = JobParams(max_new_tokens=6, temperature=0.8, seed=11)


def machine(tmp_path, name: str) -> tuple[dict, object]:
    """(environment, working directory) of one simulated machine."""
    root = tmp_path / name
    (root / "home").mkdir(parents=True)
    return os.environ | {"FLEXJOB_HOME": str(root / "home")}, root


def flexjob(args: list, env: dict, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(flexjob_command(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_machines_and_a_third_for_results_share_only_the_database(tmp_path, tiny_model, pg_url, run_worker):
    rows = [f"{p} # {i}" for i, p in enumerate(SAMPLE_PROMPTS * 2)]
    env_a, dir_a = machine(tmp_path, "a")
    prompts = write_prompts(dir_a / "prompts.parquet", rows, ids=[f"r{i}" for i in range(len(rows))])
    enqueued = flexjob(["enqueue", prompts, "--model", tiny_model, "--db", pg_url, "--id-column", "id",
                        "--shard-rows", 4, "--max-new-tokens", PARAMS.max_new_tokens, "--temperature",
                        PARAMS.temperature, "--seed", PARAMS.seed], env_a, dir_a)
    assert enqueued.returncode == 0, enqueued.stderr
    prompts.unlink()  # machine A's file is not reachable from the others
    workers = []
    for name in ("b", "c"):
        env, cwd = machine(tmp_path, name)
        workers.append(subprocess.Popen(
            flexjob_command("work", "--db", pg_url, "--exit-when-idle", "--gpu-batch-size", 2,
                            "--offload-dir", cwd / "tier"),
            env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert all("committed" in out for out in outputs), outputs  # both machines did part of the job
    env_d, dir_d = machine(tmp_path, "d")
    got = flexjob(["results", 1, "-o", "out.parquet", "--db", pg_url], env_d, dir_d)
    assert got.returncode == 0, got.stderr
    db = open_store(pg_url)
    assert store.get_job(db, 1).status == JobStatus.COMPLETED
    clean = open_store(f"sqlite:///{tmp_path / 'clean.db'}")
    reference = enqueue(clean, write_prompts(tmp_path / "again.parquet", rows,
                                             ids=[f"r{i}" for i in range(len(rows))]),
                        model_dir=tiny_model, id_column="id", params=PARAMS, shard_rows=4).job
    run_worker(clean, block=3)
    assert read_results(dir_d / "out.parquet") == read_results(
        write_results(clean, reference.id, tmp_path / "clean.parquet").path)
