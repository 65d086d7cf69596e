"""Is a worker's process still there? Certain on its own host, a guess from heartbeats elsewhere.

A worker records its host name, pid and the process's start time when it registers. On the same
host, the pid and start time together name one process: if no process has that pid, or the one
that has it started at another time (the pid was reused), or it is a zombie (killed, not yet
reaped), the worker is dead for certain and its shards can be taken over at once. On another host
nothing is certain: a worker whose heartbeat is late may be stalled or cut off from the store, so
there only its lease's expiry frees its shard.
"""
from __future__ import annotations

import enum
import socket

import psutil

from jobrunner.store.models import Worker, WorkerStatus

START_TIME_TOLERANCE_S = 0.01  # the OS reports start times in clock ticks (10 ms)


class WorkerState(str, enum.Enum):
    LIVE = "live"          # running, heartbeat within the stale limit
    STALE = "stale"        # running, but no heartbeat within the stale limit (stalled, cut off, or dead elsewhere)
    DEAD = "dead"          # its process is gone (checked on its host, or found so by a takeover)
    STOPPED = "stopped"    # exited cleanly


def host_name() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), or None when there is none."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def process_gone(pid: int, started_at: float | None) -> bool:
    """True when the process (pid, start time) of this host no longer runs. Without a recorded start
    time only an absent pid counts (a reused pid cannot be told apart)."""
    now_started = process_start_time(pid)
    if now_started is None:
        return True
    return started_at is not None and abs(now_started - started_at) > START_TIME_TOLERANCE_S


def certainly_dead(worker: Worker) -> bool:
    """A running worker of this host whose process is gone."""
    return (worker.status == WorkerStatus.RUNNING and worker.hostname == host_name()
            and process_gone(worker.pid, worker.process_started_at))


def worker_state(worker: Worker, *, heartbeat_age_s: float, stale_after_s: float) -> WorkerState:
    if worker.status == WorkerStatus.STOPPED:
        return WorkerState.STOPPED
    if worker.status == WorkerStatus.DEAD or certainly_dead(worker):
        return WorkerState.DEAD
    return WorkerState.STALE if heartbeat_age_s > stale_after_s else WorkerState.LIVE
