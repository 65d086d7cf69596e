"""The worker outlives a dropped PostgreSQL connection: the store call in flight fails, is retried
with backoff and succeeds; nothing is lost or registered twice. Real server, real backends killed
with pg_terminate_backend (picked by application_name, so no other test's connection is touched)."""
from __future__ import annotations

import subprocess
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, select, text

from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store import EventKind
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus, Shard
from jobrunner.worker.store_retry import StoreRetry
from tests.jobrunner.test_store import new_job, part_for
from tests.support import store_reads
from tests.support.tcp_proxy import TcpProxy
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts

pytestmark = pytest.mark.postgres


def tagged(url: str) -> tuple[str, str]:
    """The URL with an application_name that marks this test's connections."""
    name = f"fjtest-{uuid.uuid4().hex[:10]}"
    return f"{url}&application_name={name}", name


def terminate(admin, name: str, *, waiting_on_lock: bool = False) -> int:
    query = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"
    if waiting_on_lock:
        query += " AND wait_event_type = 'Lock'"
    with admin.connect() as conn:
        return conn.execute(text(query), {"name": name}).scalar()


def test_a_commit_whose_connection_is_killed_is_retried_and_registered_once(pg_url):
    url, name = tagged(pg_url)
    db = open_store(url)
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    lease = store.claim_shard(db, store.register_worker(db, device="cpu"), lease_s=60)
    messages: list[str] = []
    result: list[bool] = []
    commit = threading.Thread(target=lambda: result.append(StoreRetry(budget_s=30, report=messages.append)(
        store.commit_block, db, lease, part_for(lease, [0, 1, 2, 3]))))
    with open_store(pg_url, migrate=False).connect() as blocker:
        blocker.execute(select(Shard).where(Shard.id == lease.shard_id).with_for_update())  # the commit waits
        commit.start()
        deadline = time.monotonic() + 20
        while not terminate(admin, name, waiting_on_lock=True) and time.monotonic() < deadline:
            time.sleep(0.05)  # kill the commit's backend while its transaction is open
        assert time.monotonic() < deadline
        blocker.rollback()
    commit.join(timeout=30)
    assert result == [True]
    assert messages[0].startswith("job store unreachable (OperationalError") and "reachable again" in messages[-1]
    assert [p.row_ids for p in store.job_parts(db, lease.job_id)] == [[0, 1, 2, 3]]
    assert store.get_job(db, lease.job_id).status == JobStatus.COMPLETED
    # The same commit again (its answer lost after it went in) changes nothing.
    assert store.commit_block(db, lease, part_for(lease, [0, 1, 2, 3])) is True
    assert store.get_job(db, lease.job_id).done_rows == 4


@pytest.mark.slow
def test_a_worker_whose_connections_are_killed_finishes_the_job(tmp_path, pg_url, tiny_model, run_worker):
    url, name = tagged(pg_url)
    db = open_store(url)
    prompts = write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS)
    params = JobParams(max_new_tokens=8)
    job = enqueue(db, prompts, model_dir=tiny_model, params=params, shard_rows=3).job
    proc = subprocess.Popen(flexjob_command("work", "--db", url, "--exit-when-idle", "--gpu-batch-size", 3,
                                            "--progress-every", 2, "--offload-dir", tmp_path / "offload"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    killed = 0
    try:
        while proc.poll() is None:  # every backend the worker holds, again and again while it runs
            killed += terminate(admin, name)
            time.sleep(0.3)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert killed > 0
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert {s.attempt for s in store.list_shards(db, job.id)} == {1}  # never released, never taken over
    assert not store_reads.events(db, job_id=job.id, kinds=[EventKind.ENGINE_ERROR])
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    clean = open_store(f"sqlite:///{tmp_path / 'clean.db'}")
    reference = enqueue(clean, prompts, model_dir=tiny_model, params=params, shard_rows=3).job
    run_worker(clean, block=3)
    assert got == read_results(write_results(clean, reference.id, tmp_path / "clean.parquet").path)


@pytest.mark.slow
def test_a_worker_rides_out_a_store_that_is_unreachable_for_a_while(tmp_path, pg_url, tiny_model, run_worker):
    """The network to PostgreSQL is cut (open connections dropped, new ones refused) for 6 s, twice,
    mid-run (longer than the 3 s between heartbeats, shorter than the 12 s lease): the worker
    retries with backoff, says so, and the job completes as a clean run does."""
    proxy = TcpProxy(("127.0.0.1", 5432))
    url = pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    assert url != pg_url
    db = open_store(pg_url)
    # 20 shards: on a fast host one takes ~0.1 s, and the job must outlast both cuts' starts.
    prompts = write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS * 5)
    params = JobParams(max_new_tokens=16)
    job = enqueue(db, prompts, model_dir=tiny_model, params=params, shard_rows=3).job
    proc = subprocess.Popen(flexjob_command("work", "--db", url, "--exit-when-idle", "--gpu-batch-size", 3,
                                            "--progress-every", 2, "--lease", 12, "--offload-dir", tmp_path / "offload"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for rows_before_cut in (1, 7):
            deadline = time.monotonic() + 120
            while store.get_job(db, job.id).done_rows < rows_before_cut and time.monotonic() < deadline:
                time.sleep(0.2)
            assert store.get_job(db, job.id).status != JobStatus.COMPLETED, "the job finished before the cut"
            proxy.cut()
            time.sleep(6.0)
            proxy.restore()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "job store unreachable" in output and "reachable again" in output
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    clean = open_store(f"sqlite:///{tmp_path / 'clean.db'}")
    reference = enqueue(clean, prompts, model_dir=tiny_model, params=params, shard_rows=3).job
    run_worker(clean, block=3)
    assert got == read_results(write_results(clean, reference.id, tmp_path / "clean.parquet").path)


@pytest.mark.slow
def test_a_worker_started_while_the_store_is_down_waits_for_it(tmp_path, pg_url, tiny_model):
    """The server is unreachable as the worker opens the store: it says so, retries, and once the
    network is back it does the whole job (instead of exiting with 'cannot open database')."""
    proxy = TcpProxy(("127.0.0.1", 5432))
    url = pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")
    db = open_store(pg_url)
    job = enqueue(db, write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS), model_dir=tiny_model,
                  params=JobParams(max_new_tokens=4), shard_rows=3).job
    proxy.cut()
    proc = subprocess.Popen(flexjob_command("work", "--db", url, "--exit-when-idle", "--gpu-batch-size", 3,
                                            "--lease", 30, "--offload-dir", tmp_path / "offload"),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        before = []
        for line in proc.stdout:  # until the worker has tried and failed to open the store
            before.append(line)
            if "job store unreachable" in line:
                break
        proxy.restore()
        after, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(before) + after
    assert "cannot open database" in before[-1] and "reachable again" in after
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert store.get_job(db, job.id).done_rows == len(SAMPLE_PROMPTS)
