"""The kinds of events in the store's append-only log, one Enum for every writer and reader.

The values are what the `events.kind` column holds; they never change, so a store written by any
flexjob version reads the same.
"""
from __future__ import annotations

import enum


class EventKind(str, enum.Enum):
    JOB_ENQUEUED = "job_enqueued"
    JOB_STARTED = "job_started"          # the first claim of one of its shards
    JOB_COMPLETED = "job_completed"
    JOB_FAILED = "job_failed"
    JOB_CANCEL = "job_cancel"            # cancel asked (the job is cancelling or cancelled)
    JOB_CANCELLED = "job_cancelled"
    JOB_RETRY = "job_retry"
    PARTS_DROPPED = "parts_dropped"      # registered parts unregistered, their rows reopened
    SHARD_CLAIMED = "shard_claimed"
    SHARD_RESUMED = "shard_resumed"      # a claim that continues saved progress
    SHARD_RELEASED = "shard_released"
    LEASE_EXPIRED = "lease_expired"      # a shard taken over after its holder's lease ran out
    WORKER_DEAD = "worker_dead"          # a shard taken over at once: its holder's process is gone
    BLOCK_COMMITTED = "block_committed"
    WRITE_FENCED = "write_fenced"        # a superseded lease holder's write (commit, progress, heartbeat) refused
    ENGINE_ERROR = "engine_error"
    CHECKPOINT_DAMAGED = "checkpoint_damaged"  # saved progress failed its checksum: dropped, rows redone
    DISK_FULL = "disk_full"              # a worker's disk tier filled up: shard released, worker backs off
    REPLAN = "replan"
    WORKER_STARTED = "worker_started"
    WORKER_STOPPED = "worker_stopped"


# Shards taken from another worker: after a lease expired, or at once from a dead process.
TAKEOVER_KINDS = (EventKind.LEASE_EXPIRED, EventKind.WORKER_DEAD)
