"""Eight claimer processes race for 200 single-row shards on a SQLite file and on PostgreSQL: every
shard is claimed exactly once (attempt 1 in the store, once in the claimers' own logs) and the job
completes. Throughput is measured by benchmarks/bench_claims.py, not here."""
from __future__ import annotations

import pytest

from jobrunner import store
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus
from tests.support.claimers import double_claims, run_claimers
from tests.support.cli_jobs import code_prompts, enqueue_cli, postgres_unreachable, store_url

SHARDS = 200
CLAIMERS = 8


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_concurrent_claimers_never_claim_a_shard_twice(backend, tmp_path, tiny_model):
    if backend == "postgres" and (why := postgres_unreachable()):
        pytest.skip(why)
    with store_url(backend, tmp_path / "store") as url:
        job_id = enqueue_cli(url, code_prompts(tmp_path / "p.parquet", SHARDS), tiny_model, "--shard-rows", "1")
        run = run_claimers(url, CLAIMERS, timeout_s=400)
        db = open_store(url, must_exist=True)
        checks = double_claims(db, job_id, run)
        assert checks == {"shards": SHARDS, "attempts_over_1": [], "not_done": [], "logged_twice": [],
                          "never_logged": [], "job_rows_done": SHARDS}
        assert run.claims == SHARDS
        assert store.get_job(db, job_id).status == JobStatus.COMPLETED
        assert sum(1 for log in run.logs if log.claims) > 1  # the claimers did race
