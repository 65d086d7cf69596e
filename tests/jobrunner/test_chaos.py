"""A small chaos run: `flexjob work` processes on one SQLite file are SIGKILLed at random moments
and one is stalled (SIGSTOP) past its lease; fresh workers keep coming until the job is done.
Then every row is there once, the output equals an undisturbed run, no lease is left behind,
killed shard holders were taken over at once (their processes gone), and the stalled worker's
shard went to another worker when its lease ran out (its late writes are fenced off)."""
from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest

from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store import EventKind
from jobrunner.store.db import open_store
from jobrunner.store.models import JobStatus, ShardStatus
from tests.support import store_reads
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts
from tests.support.machines import wait_stopped

KILLS = 6
LEASE_S = 6.0
STALL_MAX_S = 300.0  # the stalled worker stays stopped until its shard is taken over, at most this
PARAMS = JobParams(max_new_tokens=12)


def start_worker(url: str, tmp_path) -> subprocess.Popen:
    return subprocess.Popen(flexjob_command("work", "--db", url, "--exit-when-idle", "--gpu-batch-size", 3,
                                            "--progress-every", 2, "--lease", LEASE_S,
                                            "--offload-dir", tmp_path / "offload"),
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def holding(db, job_id: int) -> set[int]:
    """Pids of the workers that hold a shard of the job now."""
    holders = {s.worker_id for s in store.list_shards(db, job_id) if s.status == ShardStatus.LEASED}
    return {w.pid for w in store_reads.workers(db) if w.id in holders}


def taken_over(db, job_id: int, pid: int) -> bool:
    """Whether a shard of the worker with this pid was taken over after its lease ran out."""
    ids = {w.id for w in store_reads.workers(db) if w.pid == pid}
    return any(e.data["previous_worker"] in ids
               for e in store_reads.events(db, job_id=job_id, kinds=[EventKind.LEASE_EXPIRED]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_random_kills_and_a_stall_lose_and_duplicate_nothing(tmp_path, tiny_model, run_worker):
    rng = random.Random(17)
    prompts = write_prompts(tmp_path / "p.parquet", [f"{p} # {i}" for i, p in enumerate(SAMPLE_PROMPTS * 6)])
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, prompts, model_dir=tiny_model, params=PARAMS, shard_rows=3).job
    workers = [start_worker(url, tmp_path) for _ in range(2)]
    kills = holder_kills = 0
    stalled: subprocess.Popen | None = None
    stall_ends = 0.0  # while set, the stalled worker is stopped and two others run beside it
    deadline = time.monotonic() + 800
    while store.get_job(db, job.id).status != JobStatus.COMPLETED and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.2))  # kills come faster than a replacement worker starts
        # It wakes once another worker has taken its shard over (its lease ran out), so that what it
        # writes late is fenced off; a fixed stall lets it wake first where workers start slowly.
        if stall_ends and (taken_over(db, job.id, stalled.pid) or time.monotonic() >= stall_ends):
            stalled.send_signal(signal.SIGCONT)
            stall_ends = 0.0
        running = [w for w in workers if w.poll() is None and w is not stalled]
        # The first kill waits for a worker that holds a shard (on a slow host the kills would
        # otherwise all land on workers still starting); the others fall at random.
        held = holding(db, job.id)
        victims = running if holder_kills else [w for w in running if w.pid in held]
        if kills < KILLS and victims:
            victim = rng.choice(victims)
            holder_kills += victim.pid in held
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
        elif stalled is None and running and holding(db, job.id) & {w.pid for w in running}:
            stalled = next(w for w in running if w.pid in holding(db, job.id))
            stalled.send_signal(signal.SIGSTOP)
            wait_stopped(stalled.pid)
            stall_ends = time.monotonic() + STALL_MAX_S
            if stalled.pid not in holding(db, job.id):  # it committed its shard before it stopped
                stalled.send_signal(signal.SIGCONT)
                stalled, stall_ends = None, 0.0
        # Workers keep coming during the stall: one of them takes the shard over once its lease has
        # run out (before that its holder counts as live and an idle worker exits).
        workers = [w for w in workers if w.poll() is None]
        while len([w for w in workers if not (stall_ends and w is stalled)]) < 2:
            workers.append(start_worker(url, tmp_path))
    if stall_ends:  # the job was finished by others while it was stopped
        stalled.send_signal(signal.SIGCONT)
    for w in workers:
        w.wait(timeout=120)
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert all(s.status == ShardStatus.DONE and s.lease_expires_at is None for s in store.list_shards(db, job.id))
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    clean = open_store(f"sqlite:///{tmp_path / 'clean.db'}")
    reference = enqueue(clean, prompts, model_dir=tiny_model, params=PARAMS, shard_rows=3).job
    run_worker(clean, block=3)
    assert got == read_results(write_results(clean, reference.id, tmp_path / "clean.parquet").path)
    dead_takeovers = store_reads.events(db, job_id=job.id, kinds=[EventKind.WORKER_DEAD])
    assert kills == KILLS and holder_kills > 0 and dead_takeovers  # killed holders were taken over at once
    if stalled is not None:  # its shard went to another worker when its lease ran out
        assert taken_over(db, job.id, stalled.pid)
