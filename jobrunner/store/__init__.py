"""The job store: every query and state change of jobs, shards, workers and events.

Each function is one transaction and returns detached ORM snapshots (read them, do not modify
them). `db` opens a store (SQLite file or PostgreSQL) and migrates it; `models` holds the tables.

    jobs    enqueue_job, get_job, list_jobs, list_shards, job_parts, failed_row_parts, drop_parts,
            cancel_job, retry_job, register_worker, worker_seen, stop_worker, list_workers,
            record_event, list_events, save_hardware_profile, latest_hardware_profile
    shards  the lease lifecycle: claim_shard, heartbeat, save_progress, load_progress,
            committed_rows, commit_block, release_shard, fail_job_for_lease
"""
from jobrunner.store.base import Lease, LeaseLost
from jobrunner.store.jobs import (NewJob, cancel_job, drop_parts, enqueue_job, failed_row_parts, get_job,
                                  job_parts, latest_hardware_profile, list_events, list_jobs, list_shards,
                                  list_workers, record_event, register_worker, retry_job, save_hardware_profile,
                                  stop_worker, worker_seen)
from jobrunner.store.shards import (PartRecord, RowProgress, claim_shard, commit_block, committed_rows,
                                    fail_job_for_lease, heartbeat, load_progress, release_shard, save_progress)

__all__ = [
    "Lease", "LeaseLost", "NewJob", "PartRecord", "RowProgress",
    "enqueue_job", "get_job", "list_jobs", "list_shards", "job_parts", "failed_row_parts", "drop_parts",
    "cancel_job", "retry_job", "register_worker", "worker_seen", "stop_worker", "list_workers",
    "record_event", "list_events", "save_hardware_profile", "latest_hardware_profile",
    "claim_shard", "heartbeat", "save_progress", "load_progress", "committed_rows", "commit_block",
    "release_shard", "fail_job_for_lease",
]
