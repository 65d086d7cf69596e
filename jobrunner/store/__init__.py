"""The job store: every query and state change of jobs, shards, workers and events.

Each function is one transaction and returns detached ORM snapshots (read them, do not modify
them). `db` opens a store (SQLite file or PostgreSQL) and migrates it; `models` holds the tables;
`events` the kinds of the event log; `queries` the read queries behind `status` and `report`.

    jobs    enqueue_job, get_job, list_jobs, list_shards, job_parts, failed_row_parts, drop_parts,
            cancel_job, retry_job, register_worker, worker_seen, stop_worker, record_event
    shards  the lease lifecycle: claim_shard, heartbeat, save_progress, load_progress,
            committed_rows, commit_block, release_shard, fail_job_for_lease
"""
from jobrunner.store.base import Lease, LeaseLost
from jobrunner.store.events import EventKind
from jobrunner.store.jobs import (NewJob, cancel_job, drop_parts, enqueue_job, failed_row_parts, get_job,
                                  job_parts, list_jobs, list_shards, record_event, register_worker, retry_job,
                                  stop_worker, worker_seen)
from jobrunner.store.shards import (PartRecord, RowProgress, claim_shard, commit_block, committed_rows,
                                    fail_job_for_lease, heartbeat, load_progress, release_shard, save_progress)

__all__ = [
    "EventKind", "Lease", "LeaseLost", "NewJob", "PartRecord", "RowProgress",
    "enqueue_job", "get_job", "list_jobs", "list_shards", "job_parts", "failed_row_parts", "drop_parts",
    "cancel_job", "retry_job", "register_worker", "worker_seen", "stop_worker", "record_event",
    "claim_shard", "heartbeat", "save_progress", "load_progress", "committed_rows", "commit_block",
    "release_shard", "fail_job_for_lease",
]
