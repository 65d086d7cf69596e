"""The store's state transitions on a real SQLite file and on the real PostgreSQL server."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import text

from jobrunner import store
from jobrunner.store.db import head_revision, open_store, schema_revision, write_engine
from jobrunner.errors import UserError
from jobrunner.store.models import JobStatus, ShardStatus, utcnow
from jobrunner.store import LeaseLost, PartRecord, RowProgress
from jobrunner.store.shards import ENGINE_FAILURE_LIMIT
from jobrunner.store.events import EventKind
from tests.support import store_reads


def new_job(key: str = "k1", *, rows: int = 10, shard_rows: int = 4, priority: int = 0) -> store.NewJob:
    return store.NewJob(name=f"job-{key}", priority=priority, job_key=key, input_path="/in.parquet",
                        input_fingerprint="f" * 64, input_size=1, input_mtime_ns=1, prompt_column="prompt",
                        id_column=None, model_dir="/model", model_fingerprint="m" * 64,
                        params={"max_new_tokens": 4}, results_dir="/results/job-{job}", shard_rows=shard_rows,
                        total_rows=rows)


def part_for(lease, rows: list[int], *, failed: int = 0) -> PartRecord:
    return PartRecord(path=f"part-{lease.shard_index}-{lease.attempt}-{rows[0]}.parquet", data=b"", row_ids=tuple(rows),
                      failed_rows=failed, generated_tokens=4 * len(rows), size_bytes=1, sha256="0" * 64,
                      block_seconds=0.1)


@pytest.fixture
def db(any_db_url):
    return open_store(any_db_url)


@pytest.fixture
def worker(db):
    return store.register_worker(db, device="cpu")


def test_migrations_create_the_schema_and_reopening_is_a_no_op(any_db_url):
    db = open_store(any_db_url)
    assert schema_revision(db) == head_revision()
    db2 = open_store(any_db_url)
    assert schema_revision(db2) == head_revision()


def test_a_database_newer_than_the_code_is_refused(any_db_url):
    db = open_store(any_db_url)
    with write_engine(db).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(UserError) as err:
        open_store(any_db_url)
    assert "schema revision 9999_future, newer than this flexjob" in str(err.value)
    assert "upgrade flexjob" in err.value.hint


def test_enqueue_creates_shards_and_is_idempotent_unless_forced(db):
    job, created = store.enqueue_job(db, new_job(rows=10, shard_rows=4))
    assert created and job.status == JobStatus.QUEUED and job.results_dir == f"/results/job-{job.id}"
    shards = store.list_shards(db, job.id)
    assert [(s.row_start, s.row_end) for s in shards] == [(0, 4), (4, 8), (8, 10)]
    again, created = store.enqueue_job(db, new_job(rows=10, shard_rows=4))
    assert not created and again.id == job.id
    forced, created = store.enqueue_job(db, new_job(rows=10, shard_rows=4), force=True)
    assert created and forced.id != job.id


def test_claim_takes_higher_priority_first_then_input_order(db, worker):
    low, _ = store.enqueue_job(db, new_job("low", rows=8, shard_rows=4))
    high, _ = store.enqueue_job(db, new_job("high", rows=8, shard_rows=4, priority=5))
    claims = [store.claim_shard(db, worker, lease_s=60) for _ in range(4)]
    assert [(c.job_id, c.shard_index) for c in claims] == [(high.id, 0), (high.id, 1), (low.id, 0), (low.id, 1)]
    assert all(c.attempt == 1 for c in claims)
    assert store.claim_shard(db, worker, lease_s=60) is None
    assert store.get_job(db, high.id).status == JobStatus.RUNNING


def test_commits_complete_the_shard_and_the_job(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=6, shard_rows=3))
    for _ in range(2):
        lease = store.claim_shard(db, worker, lease_s=60)
        assert store.commit_block(db, lease, part_for(lease, [lease.row_start])) is False
        rest = list(range(lease.row_start + 1, lease.row_end))
        assert store.commit_block(db, lease, part_for(lease, rest, failed=1)) is True
    job = store.get_job(db, job.id)
    assert job.status == JobStatus.COMPLETED and job.finished_at is not None
    assert (job.done_rows, job.failed_rows, job.generated_tokens) == (6, 2, 24)
    assert all(s.status == ShardStatus.DONE for s in store.list_shards(db, job.id))
    assert sorted(r for p in store.job_parts(db, job.id) for r in p.row_ids) == list(range(6))
    kinds = [e.kind for e in store_reads.events(db, job_id=job.id)]
    assert "job_completed" in kinds and kinds.count("block_committed") == 4


def test_progress_is_saved_loaded_and_pruned_by_commits(db, worker):
    store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    lease = store.claim_shard(db, worker, lease_s=60)
    store.save_progress(db, lease, {0: RowProgress(ids=(5, 6)), 1: RowProgress(ids=(7,), finish="stop")},
                        decode_step=2)
    assert store.load_progress(db, lease.shard_id) == {0: RowProgress(ids=(5, 6)),
                                                        1: RowProgress(ids=(7,), finish="stop")}
    store.commit_block(db, lease, part_for(lease, [1]))
    assert store.load_progress(db, lease.shard_id) == {0: RowProgress(ids=(5, 6))}
    assert store.committed_rows(db, lease.shard_id) == {1}


def test_an_expired_lease_is_taken_over_and_the_late_writer_is_fenced(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    first = store.claim_shard(db, worker, lease_s=30)
    store.save_progress(db, first, {0: RowProgress(ids=(1, 2, 3))}, decode_step=3)
    assert store.claim_shard(db, worker, lease_s=30) is None  # still leased
    other = store.register_worker(db, device="cpu")
    second = store.claim_shard(db, other, lease_s=30, now=utcnow() + timedelta(seconds=31))
    assert second.shard_id == first.shard_id and second.attempt == 2 and second.took_over
    # The successor resumes from the dead worker's saved tokens.
    assert store.load_progress(db, second.shard_id) == {0: RowProgress(ids=(1, 2, 3))}
    for late_write in (lambda: store.commit_block(db, first, part_for(first, [0, 1, 2, 3])),
                       lambda: store.heartbeat(db, first, lease_s=30),
                       lambda: store.save_progress(db, first, {}, decode_step=9),
                       lambda: store.release_shard(db, first, reason="late")):
        with pytest.raises(LeaseLost):
            late_write()
    assert store.commit_block(db, second, part_for(second, [0, 1, 2, 3])) is True
    assert store.get_job(db, job.id).done_rows == 4
    assert len(store.job_parts(db, job.id)) == 1
    assert any(e.kind == EventKind.LEASE_EXPIRED for e in store_reads.events(db, job_id=job.id))


def test_heartbeat_renews_the_lease_and_reports_a_cancel(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=8, shard_rows=4))
    lease = store.claim_shard(db, worker, lease_s=5)
    assert store.heartbeat(db, lease, lease_s=60) == JobStatus.RUNNING
    # Renewed: not claimable even after the original 5 s.
    assert store.claim_shard(db, worker, lease_s=5, now=utcnow() + timedelta(seconds=10)) is not None  # shard 1
    assert store.claim_shard(db, worker, lease_s=5, now=utcnow() + timedelta(seconds=10)) is None
    assert store.cancel_job(db, job.id).status == JobStatus.CANCELLING
    assert store.heartbeat(db, lease, lease_s=60) == JobStatus.CANCELLING


def test_cancel_then_release_cancels_the_job_and_retry_reopens_it(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=8, shard_rows=4))
    lease = store.claim_shard(db, worker, lease_s=60)
    store.save_progress(db, lease, {0: RowProgress(ids=(4,))}, decode_step=1)
    assert store.cancel_job(db, job.id).status == JobStatus.CANCELLING
    store.release_shard(db, lease, reason="cancelled")
    assert store.get_job(db, job.id).status == JobStatus.CANCELLED
    with pytest.raises(UserError, match="already cancelled"):
        store.cancel_job(db, job.id)
    assert store.retry_job(db, job.id).status == JobStatus.QUEUED
    again = store.claim_shard(db, worker, lease_s=60)
    assert again.attempt == 2 and store.load_progress(db, again.shard_id) == {0: RowProgress(ids=(4,))}


def test_a_cancel_whose_worker_died_finishes_when_the_lease_expires(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    store.claim_shard(db, worker, lease_s=1)
    assert store.cancel_job(db, job.id).status == JobStatus.CANCELLING
    assert store.claim_shard(db, worker, lease_s=1, now=utcnow() + timedelta(seconds=5)) is None
    assert store.get_job(db, job.id).status == JobStatus.CANCELLED


def test_repeated_crashes_of_a_shard_fail_the_job(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    for attempt in range(1, ENGINE_FAILURE_LIMIT + 1):
        lease = store.claim_shard(db, worker, lease_s=60, now=utcnow() + timedelta(hours=attempt))
        assert lease.attempt == attempt
        store.release_shard(db, lease, reason="crashed", error="boom", retry_after_s=60)
    job = store.get_job(db, job.id)
    assert job.status == JobStatus.FAILED and "failed 3 times: boom" in job.error
    assert store.retry_job(db, job.id).status == JobStatus.QUEUED
    assert store.claim_shard(db, worker, lease_s=60) is not None


def test_drop_parts_reopens_their_rows(db, worker):
    job, _ = store.enqueue_job(db, new_job(rows=4, shard_rows=4))
    lease = store.claim_shard(db, worker, lease_s=60)
    store.commit_block(db, lease, part_for(lease, [0, 1], failed=1))
    store.commit_block(db, lease, part_for(lease, [2, 3]))
    assert store.get_job(db, job.id).status == JobStatus.COMPLETED
    assert store.drop_parts(db, job.id, store.failed_row_parts(db, job.id), reason="test") == 2
    job = store.get_job(db, job.id)
    assert (job.status, job.done_rows, job.failed_rows) == (JobStatus.QUEUED, 2, 0)
    again = store.claim_shard(db, worker, lease_s=60)
    assert store.committed_rows(db, again.shard_id) == {2, 3}


def test_concurrent_claims_never_hand_out_a_shard_twice(db):
    store.enqueue_job(db, new_job(rows=40, shard_rows=1))
    workers = [store.register_worker(db, device="cpu") for _ in range(4)]
    claimed: list[int] = []
    lock = threading.Lock()

    def claim_all(worker_id: str) -> None:
        while (lease := store.claim_shard(db, worker_id, lease_s=60)) is not None:
            with lock:
                claimed.append(lease.shard_id)

    threads = [threading.Thread(target=claim_all, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_workers_and_events(db):
    worker_id = store.register_worker(db, device="cpu", policy={"gpu_batch_size": 8})
    store.worker_seen(db, worker_id, policy={"gpu_batch_size": 16})
    store.record_event(db, EventKind.REPLAN, worker_id=worker_id, message="8 -> 16")
    [w] = store_reads.workers(db, running_only=True)
    assert w.policy == {"gpu_batch_size": 16}
    store.stop_worker(db, worker_id, reason="idle")
    assert store_reads.workers(db, running_only=True) == []
    assert [e.kind for e in store_reads.events(db, kinds=[EventKind.REPLAN])] == [EventKind.REPLAN]
    assert [e.kind.value for e in store_reads.events(db, kinds=[EventKind.REPLAN])] == ["replan"]  # as stored
