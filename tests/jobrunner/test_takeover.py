"""Taking over the shards of a dead worker: at once when its process is certainly gone (same host:
pid absent, or reused), after the lease expires otherwise; fenced either way. Real processes (a
holder that registers and claims, then is SIGKILLed), a real SQLite file, and PostgreSQL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store import EventKind, Lease, LeaseLost
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus, ShardStatus, WorkerStatus, utcnow
from jobrunner.worker.liveness import process_gone, process_start_time, take_over_dead
from tests.jobrunner.test_store import new_job, part_for
from tests.support import store_reads
from tests.support.holders import kill, start_holder
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts


def lease_of(held: dict) -> Lease:
    return Lease(shard_id=held["shard_id"], job_id=held["job_id"], shard_index=held["shard_index"],
                 attempt=held["attempt"], worker_id=held["worker_id"], row_start=held["row_start"],
                 row_end=held["row_end"], expires_at=utcnow())


def test_a_killed_holder_on_this_host_is_taken_over_at_once_and_fenced(any_db_url):
    url = any_db_url
    db = open_store(url)
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    proc, held = start_holder(url, lease_s=60)
    me = store.register_worker(db, device="cpu")
    assert store.claim_shard(db, me, lease_s=60) is None  # alive: its lease stands
    assert take_over_dead(db, me) == []
    kill(proc)
    [(dead, freed)] = take_over_dead(db, me)
    assert dead.id == held["worker_id"] and freed == [held["shard_id"]]  # a 60 s lease, taken at once
    lease = store.claim_shard(db, me, lease_s=60)
    assert lease is not None and lease.took_over and lease.attempt == held["attempt"] + 1
    with pytest.raises(LeaseLost):  # the dead holder's commit, were it to come, is refused
        late = lease_of(held)
        store.commit_block(db, late, part_for(late, list(range(late.row_start, late.row_end))))
    assert store.commit_block(db, lease, part_for(lease, list(range(lease.row_start, lease.row_end)))) is True
    [dead] = [w for w in store_reads.workers(db) if w.id == held["worker_id"]]
    assert dead.status == WorkerStatus.DEAD
    [event] = store_reads.events(db, kinds=[EventKind.WORKER_DEAD])
    assert event.worker_id == me and event.data["previous_worker"] == held["worker_id"]
    assert f"took over shard 0 (attempt 2) from worker {held['worker_id']}: its process is gone" == event.message
    [ended] = [e for e in store_reads.events(db, kinds=[EventKind.WORKER_STOPPED]) if e.worker_id == held["worker_id"]]
    assert ended.data["dead"] and ended.data["shards"] == [{"job_id": 1, "shard_index": 0, "attempt": 1}]


def test_a_holder_on_another_machine_waits_for_its_lease(tmp_path):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    proc, held = start_holder(url, lease_s=2, host_id="another-machine/pid:[1]")
    kill(proc)  # its pid is gone here, but the pid named a process of another machine
    me = store.register_worker(db, device="cpu")
    assert take_over_dead(db, me) == []
    assert store.claim_shard(db, me, lease_s=60) is None
    lease = store.claim_shard(db, me, lease_s=60, now=utcnow() + timedelta(seconds=3))
    assert lease is not None and lease.took_over
    [event] = store_reads.events(db, kinds=[EventKind.LEASE_EXPIRED])
    assert "its lease ran out" in event.message and not event.data["holder_dead"]


def test_a_reused_pid_and_a_zombie_count_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = process_start_time(proc.pid)
        assert started is not None and not process_gone(proc.pid, started)
        assert process_gone(proc.pid, started - 5.0)  # the pid now names a process that started later
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_start_time(proc.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)  # killed, not reaped yet: a zombie
        assert process_gone(proc.pid, started)
    finally:
        proc.kill()
        proc.wait()
    assert process_gone(proc.pid, started)


# -- `flexjob work` end to end ------------------------------------------------------------------
def work(url: str, tmp_path, *extra: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    args = flexjob_command("work", "--db", url, "--exit-when-idle", "--gpu-batch-size", 3, "--progress-every", 2,
                           "--offload-dir", tmp_path / "offload", *extra)
    return subprocess.run(args, cwd=tmp_path, env=os.environ | (env or {}), capture_output=True, text=True,
                          timeout=timeout)


def one_job(tmp_path, model, *, rows: int, max_new_tokens: int, url: str | None = None):
    """A store (default: a SQLite file) with one job of `rows` prompts in one shard: (url, store, job)."""
    url = url or f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, write_prompts(tmp_path / "p.parquet", SAMPLE_PROMPTS[:rows]), model_dir=model,
                  params=JobParams(max_new_tokens=max_new_tokens), shard_rows=rows).job
    return url, db, job


def status_workers(url: str, tmp_path) -> dict[str, dict]:
    out = subprocess.run(flexjob_command("status", "--json", "--db", url), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return {w["id"]: w for w in json.loads(out)["workers"]}


@pytest.mark.slow
def test_after_kill_9_a_new_worker_finishes_the_job_without_waiting_for_the_lease(tmp_path, tiny_model, any_db_url):
    url, db, job = one_job(tmp_path, tiny_model, rows=6, max_new_tokens=8, url=any_db_url)
    killed = work(url, tmp_path, env={"FLEXJOB_TEST_KILL_AT": "decode:3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [shard] = store.list_shards(db, job.id)
    assert shard.status == ShardStatus.LEASED and shard.lease_expires_at > utcnow() + timedelta(seconds=30)
    assert status_workers(url, tmp_path)[shard.worker_id]["state"] == "dead"  # before anyone took over
    started = time.monotonic()
    second = work(url, tmp_path)
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - started < 50  # well inside the dead worker's 60 s lease
    assert f"worker {shard.worker_id} is dead (process" in second.stderr
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    rows = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert [r["row"] for r in rows] == list(range(6))
    [takeover] = store_reads.events(db, job_id=job.id, kinds=[EventKind.WORKER_DEAD])
    assert takeover.message.startswith(f"took over shard 0 (attempt 2) from worker {shard.worker_id}")
    dead = status_workers(url, tmp_path)[shard.worker_id]
    assert dead["status"] == "dead" and dead["state"] == "dead"


@pytest.mark.slow
def test_exit_when_idle_waits_for_a_lease_that_will_run_out_then_finishes(tmp_path, tiny_model):
    url, db, job = one_job(tmp_path, tiny_model, rows=3, max_new_tokens=2)
    # A holder on another machine that stopped renewing 12 s ago: its 20 s lease runs out in 8 s.
    proc, held = start_holder(url, lease_s=20, ago_s=12, host_id="another-machine/pid:[1]")
    try:
        done = work(url, tmp_path)
    finally:
        kill(proc)
    assert done.returncode == 0, done.stderr
    assert (f"waiting: shard 0 of job {job.id} is held by worker {held['worker_id']} (last heartbeat"
            in done.stderr and "its lease runs out at" in done.stderr)
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert [s.attempt for s in store.list_shards(db, job.id)] == [2]


@pytest.mark.slow
def test_exit_when_idle_leaves_shards_of_live_workers_alone(tmp_path, tiny_model):
    url, db, job = one_job(tmp_path, tiny_model, rows=3, max_new_tokens=2)
    proc, held = start_holder(url, lease_s=60)  # alive on this host: its shard is its own
    try:
        idle = work(url, tmp_path, timeout=120)
        assert idle.returncode == 0, idle.stderr
        assert "waiting:" not in idle.stderr and "worker stopped (idle): 0 shards, 0 rows" in idle.stdout + idle.stderr
        [shard] = store.list_shards(db, job.id)
        assert shard.worker_id == held["worker_id"] and shard.attempt == 1
    finally:
        kill(proc)
