"""`flexjob cancel` mid-block keeps the work done: the worker learns of the cancel at its heartbeat,
stops the block at the next step boundary and saves the generated ids of the rows in flight (as
on SIGTERM), so `flexjob retry` resumes them and the output equals an uninterrupted run."""
from __future__ import annotations

import threading

import pytest

from engine.runtime.policy import Policy
from jobrunner import store
from jobrunner.io.enqueue import JobParams, enqueue
from jobrunner.io.results import write_results
from jobrunner.store.db import open_store
from jobrunner.store.events import EventKind
from jobrunner.store.models import JobStatus, ShardStatus
from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig
from tests.support import store_reads
from tests.support.jobs import SAMPLE_PROMPTS, read_results, write_prompts

ROWS = 4
MAX_NEW = 120
CANCEL_AFTER_TOKENS = 40 * ROWS  # well into the block's decode, well before its end


class StepWatch(PlainReporter):
    """Log lines as usual, and an event once the block has generated `tokens` tokens."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.reached, self._want = threading.Event(), tokens

    def step(self, *, new_tokens: int) -> None:
        super().step(new_tokens=new_tokens)
        if self.tokens >= self._want:
            self.reached.set()


def config(offload_dir) -> WorkerConfig:
    # No periodic progress saves: whatever progress the store holds was saved by the cancel.
    return WorkerConfig(policy=Policy(gpu_batch_size=ROWS), offload_dir=offload_dir, exit_when_idle=True,
                        progress_every=10_000, lease_s=30.0, heartbeat_s=0.05)


@pytest.mark.slow
def test_cancel_mid_block_saves_progress_and_retry_resumes_it(tmp_path, tiny_model, offload_dir):
    prompts = write_prompts(tmp_path / "prompts.parquet", SAMPLE_PROMPTS[:ROWS])
    params = JobParams(max_new_tokens=MAX_NEW)

    reference_db = open_store(f"sqlite:///{tmp_path / 'reference.db'}")
    reference = enqueue(reference_db, prompts, model_dir=tiny_model, params=params, shard_rows=ROWS).job
    Worker(reference_db, config(offload_dir)).run()
    expected = read_results(write_results(reference_db, reference.id, tmp_path / "reference.parquet").path)

    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts, model_dir=tiny_model, params=params, shard_rows=ROWS).job
    watch = StepWatch(CANCEL_AFTER_TOKENS)
    worker = threading.Thread(target=lambda: Worker(db, config(offload_dir), reporter=watch).run())
    worker.start()
    try:
        assert watch.reached.wait(120), "the worker never reached the middle of its block"
        store.cancel_job(db, job.id)
    finally:
        worker.join(120)
    assert not worker.is_alive()
    assert store.get_job(db, job.id).status == JobStatus.CANCELLED
    [shard] = store.list_shards(db, job.id)
    assert shard.status == ShardStatus.CANCELLED and store.committed_rows(db, shard.id) == set()
    saved = store.load_progress(db, shard.id)
    in_flight = [p for p in saved.values() if p.finish is None]
    assert in_flight, f"no row in flight was saved: {saved}"
    assert all(0 < len(p.ids) < MAX_NEW for p in in_flight)
    saved_tokens = sum(len(p.ids) for p in saved.values())
    assert saved_tokens >= CANCEL_AFTER_TOKENS

    store.retry_job(db, job.id)
    Worker(db, config(offload_dir)).run()
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    [resumed] = [e for e in store_reads.events(db, job_id=job.id) if e.kind == EventKind.SHARD_RESUMED]
    assert resumed.data["tokens"] == saved_tokens
    # The retry generated only what the cancelled block had not.
    assert store.get_job(db, job.id).generated_tokens == \
        store.get_job(reference_db, reference.id).generated_tokens - saved_tokens
    got = read_results(write_results(db, job.id, tmp_path / "out.parquet").path)
    assert got == expected
