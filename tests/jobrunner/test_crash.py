"""Crash safety with real processes: a `flexjob work` subprocess SIGKILLs itself at a chosen point
(FLEXJOB_TEST_KILL_AT), a fresh one finishes the job, and the output equals an uninterrupted run,
for greedy and for seeded sampling. Also SIGTERM (graceful) and two workers on one SQLite file."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from engine.runtime.policy import Policy
from jobrunner import store
from jobrunner.store.db import open_store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.store.models import JobStatus, ShardStatus, WorkerStatus
from jobrunner.io.results import write_results
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, read_results, write_prompts
from jobrunner.store.events import EventKind
from tests.support import store_reads
from tests.support.store_damage import tamper_checkpoint

MAX_NEW = 8
PROGRESS_EVERY = 2
BLOCK = 3
KILL_STEP = 5  # mid-decode, one step after a progress save (steps 2 and 4 save)
# The machine's default dtype (bfloat16 where the CPU has it): a resumed row is re-prefilled, and
# the engine's kernels make that prefill compute what the decode steps did, bit for bit.
MODES = {"greedy": JobParams(max_new_tokens=MAX_NEW),
         "seeded": JobParams(max_new_tokens=MAX_NEW, temperature=0.9, top_p=0.9, seed=1234)}


def work_args(db_url: str, offload_dir, *extra: str) -> list[str]:
    return flexjob_command("work", "--db", db_url, "--exit-when-idle", "--gpu-batch-size", BLOCK,
                           "--progress-every", PROGRESS_EVERY, "--offload-dir", offload_dir, *extra)


def run(args: list[str], cwd, env_extra: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | (env_extra or {})
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "prompts.parquet"
    return write_prompts(path, SAMPLE_PROMPTS[:6])


_REFERENCE: dict[str, list[dict]] = {}


@pytest.fixture
def uninterrupted(tmp_path_factory, tiny_model, crash_inputs, run_worker):
    """Reference output per mode from a worker nobody disturbs (computed once per module)."""
    if not _REFERENCE:
        base = tmp_path_factory.mktemp("reference")
        for mode, params in MODES.items():
            db = open_store(f"sqlite:///{base / f'{mode}.db'}")
            job = enqueue(db, crash_inputs, model_dir=tiny_model, params=params, shard_rows=6).job
            run_worker(db, block=BLOCK, progress_every=PROGRESS_EVERY)
            _REFERENCE[mode] = read_results(write_results(db, job.id, base / f"{mode}.parquet").path)
    return _REFERENCE


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kill_at", ["prefill", f"decode:{KILL_STEP}", "before_commit", "during_commit"])
def test_sigkill_then_restart_gives_identical_output(tmp_path, tiny_model, crash_inputs, uninterrupted, run_worker,
                                                     mode, kill_at):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, crash_inputs, model_dir=tiny_model, params=MODES[mode], shard_rows=6).job
    killed = run(work_args(url, tmp_path / "offload"), cwd=tmp_path, env_extra={"FLEXJOB_TEST_KILL_AT": kill_at})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [shard] = store.list_shards(db, job.id)
    assert shard.status == ShardStatus.LEASED  # the dead worker never released it
    if kill_at.startswith("decode"):
        # Re-done work is bounded by the progress interval: each live row had KILL_STEP + 1 tokens.
        saved = store.load_progress(db, shard.id)
        assert saved and all(KILL_STEP + 1 - len(p.ids) <= PROGRESS_EVERY for p in saved.values() if not p.finish)
    if kill_at in ("before_commit", "during_commit"):
        # Killed with the block generated and (during_commit) its part written inside the open
        # transaction: nothing of it is registered, nothing is left behind, the finished rows' ids
        # were saved as progress so the restart redoes no decode step.
        assert store.job_parts(db, job.id) == []
        assert all(p.finish for p in store.load_progress(db, shard.id).values())
    # The restart (in-process: same code) finds the killed worker's process gone and takes its
    # shard over at once, without waiting out the 60 s lease.
    started = time.monotonic()
    run_worker(db, block=BLOCK, progress_every=PROGRESS_EVERY, lease_s=60.0)
    assert time.monotonic() - started < 60
    assert any(e.kind == EventKind.WORKER_DEAD for e in store_reads.events(db, job_id=job.id))
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert got == uninterrupted[mode]


@pytest.mark.slow
def test_a_damaged_checkpoint_is_detected_and_its_rows_redone(tmp_path, tiny_model, crash_inputs, uninterrupted,
                                                             run_worker):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, crash_inputs, model_dir=tiny_model, params=MODES["seeded"], shard_rows=6).job
    killed = run(work_args(url, tmp_path / "offload"), cwd=tmp_path,
                 env_extra={"FLEXJOB_TEST_KILL_AT": f"decode:{KILL_STEP}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [shard] = store.list_shards(db, job.id)
    tamper_checkpoint(db, shard.id)
    run_worker(db, block=BLOCK, progress_every=PROGRESS_EVERY)
    [damaged] = store_reads.events(db, job_id=job.id, kinds=[EventKind.CHECKPOINT_DAMAGED])
    assert damaged.message == "saved progress of shard 0 is damaged (checksum mismatch); its rows start over"
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert got == uninterrupted["seeded"]


@pytest.mark.slow
def test_sigterm_saves_progress_releases_the_lease_and_exits_promptly(tmp_path, tiny_model, crash_inputs,
                                                                       uninterrupted, run_worker):
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, crash_inputs, model_dir=tiny_model, params=MODES["greedy"], shard_rows=6).job
    proc = subprocess.Popen(work_args(url, tmp_path / "offload"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        shard_id = None
        while time.monotonic() < deadline and proc.poll() is None:
            shards = store.list_shards(db, job.id)
            if shards[0].status == ShardStatus.LEASED and store.load_progress(db, shards[0].id):
                shard_id = shards[0].id
                break
            time.sleep(0.005)  # the window between a progress save and the shard's end is short
        if shard_id is None:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the worker never showed saved progress (exit {proc.returncode}):\n{err[-3000:]}")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=20)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert elapsed < 10
    assert "SIGTERM: saving progress" in stderr
    [shard] = store.list_shards(db, job.id)
    assert shard.status in (ShardStatus.PENDING, ShardStatus.DONE)
    assert shard.worker_id is None
    if shard.status == ShardStatus.PENDING:  # (DONE: the signal landed as the shard's last block finished)
        assert "lease released" in stderr
        # Work done before the signal survives: as saved progress of the rows in flight, or — when
        # the signal landed just after a block commit, with nothing in flight — as committed rows.
        assert store.load_progress(db, shard.id) or store.committed_rows(db, shard.id)
    assert all(w.status == WorkerStatus.STOPPED for w in store_reads.workers(db))
    run_worker(db, block=BLOCK, progress_every=PROGRESS_EVERY)
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert got == uninterrupted["greedy"]


@pytest.mark.slow
def test_two_workers_on_one_sqlite_job_lose_and_duplicate_nothing(tmp_path, tiny_model, offload_dir):
    prompts = [f"{p} # {i}" for i, p in enumerate(SAMPLE_PROMPTS * 2)]
    path = write_prompts(tmp_path / "p.parquet", prompts)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    db = open_store(url)
    job = enqueue(db, path, model_dir=tiny_model, params=JobParams(max_new_tokens=4), shard_rows=2).job
    # One disk-tier directory for both: the first to load converts the weight store, the other waits.
    procs = [subprocess.Popen(work_args(url, tmp_path / "offload"), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    table = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert table.column("row").to_pylist() == list(range(len(prompts)))
    assert table.column("finish_reason").to_pylist() == ["length"] * len(prompts)
    committers = {e.worker_id for e in store_reads.events(db, job_id=job.id, kinds=[EventKind.BLOCK_COMMITTED])}
    assert len(committers) == 2, "both workers should have done some of the work"
    assert all(s.attempt == 1 for s in store.list_shards(db, job.id))  # no shard was done twice


RUN_COLUMNS = ["attempt", "block_seconds", "finished_at"]  # how this run went, not what it generated


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_two_policies_write_the_same_results(tmp_path, tiny_model, crash_inputs, run_worker, mode):
    """One block of one row against blocks of four rows in two micro-batches with the cache on disk:
    every generated column is identical, bit for bit."""
    tables = []
    for name, policy in {"1x1": Policy(gpu_batch_size=1),
                         "2x2 cache on disk": Policy.from_percents((100, 0, 0, 0, 100, 0), gpu_batch_size=2,
                                                                   num_gpu_batches=2)}.items():
        db = open_store(f"sqlite:///{tmp_path / f'{name}.db'}")
        job = enqueue(db, crash_inputs, model_dir=tiny_model, params=MODES[mode], shard_rows=6).job
        run_worker(db, policy=policy)
        tables.append(pq.read_table(write_results(db, job.id, tmp_path / f"{name}.parquet").path).drop(RUN_COLUMNS))
    assert tables[0].equals(tables[1])
    assert tables[0].column("completion").null_count == 0
