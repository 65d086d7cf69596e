"""The job store: every query and state change of jobs, shards, workers and events.

Each function is one transaction and returns detached ORM snapshots (read them, do not modify
them). `db` opens a store (SQLite file or PostgreSQL) and migrates it; `models` holds the tables;
`events` the kinds of the event log; `queries` the read queries behind `status` and `report`.

    jobs    enqueue_job, shard_input, part_bytes, get_job, list_jobs, list_shards, job_parts, failed_row_parts, drop_parts,
            cancel_job, retry_job, record_event
    workers register_worker, worker_seen, stop_worker, running_workers_on, declare_dead, held_elsewhere
    shards  the lease lifecycle: claim_shard, heartbeat, save_progress, load_progress,
            committed_rows, commit_block, release_shard, fail_job_for_lease
"""
from jobrunner.store.base import Lease, LeaseLost
from jobrunner.store.events import EventKind
from jobrunner.store.jobs import (NewJob, cancel_job, drop_parts, enqueue_job, failed_row_parts, get_job,
                                  job_parts, list_jobs, list_shards, part_bytes, record_event, retry_job,
                                  shard_input)
from jobrunner.store.shards import (PartRecord, RowProgress, claim_shard, commit_block, committed_rows,
                                    fail_job_for_lease, heartbeat, load_progress, release_shard, save_progress)
from jobrunner.store.workers import (HeldShard, declare_dead, held_elsewhere, register_worker, running_workers_on,
                                     stop_worker, worker_seen)

__all__ = [
    "EventKind", "HeldShard", "Lease", "LeaseLost", "NewJob", "PartRecord", "RowProgress",
    "enqueue_job", "shard_input", "part_bytes", "get_job", "list_jobs", "list_shards", "job_parts", "failed_row_parts", "drop_parts",
    "cancel_job", "retry_job", "record_event",
    "register_worker", "worker_seen", "stop_worker", "running_workers_on", "declare_dead", "held_elsewhere",
    "claim_shard", "heartbeat", "save_progress", "load_progress", "committed_rows", "commit_block",
    "release_shard", "fail_job_for_lease",
]
