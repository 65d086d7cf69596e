"""Is a worker's process still there? Certain on its own host, a guess from heartbeats elsewhere.

A worker records its host id, pid and the process's start time when it registers. The host id is
the kernel's boot id and the pid namespace: host names repeat across machines and containers, and
pids are only comparable within one boot and namespace. On the same host, the pid and start time
together name one process: if no process has that pid, or the one that has it started at another
time (the pid was reused), or it is a zombie (killed, not yet reaped), the worker is dead for
certain and its shards can be taken over at once. On another host nothing is certain: a worker
whose heartbeat is late may be stalled or cut off from the store, so there only its lease's expiry
frees its shard.
"""
from __future__ import annotations

import enum
import os
import socket
from datetime import datetime
from pathlib import Path

import psutil
from sqlalchemy import Engine as StoreEngine

from jobrunner import store
from jobrunner.store import HeldShard
from jobrunner.store.models import ShardStatus, Worker, WorkerStatus

START_TIME_TOLERANCE_S = 0.01  # the OS reports start times in clock ticks (10 ms)


class WorkerState(str, enum.Enum):
    LIVE = "live"          # running, heartbeat within the stale limit
    STALE = "stale"        # running, but no heartbeat within the stale limit (stalled, cut off, or dead elsewhere)
    DEAD = "dead"          # its process is gone (checked on its host, or found so by a takeover)
    STOPPED = "stopped"    # exited cleanly


def host_name() -> str:
    return socket.gethostname()


def host_id() -> str | None:
    """This boot of this machine and this pid namespace (Linux), or None where the OS lacks them."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def on_this_host(worker: Worker) -> bool:
    """Whether the worker's pid names a process of this machine and pid namespace."""
    here = host_id()
    if worker.host_id is not None or here is not None:
        return worker.host_id == here
    return worker.hostname == host_name()  # neither side knows a host id: the host name is all there is


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
    return (worker.status == WorkerStatus.RUNNING and on_this_host(worker)
            and process_gone(worker.pid, worker.process_started_at))


def take_over_dead(db: StoreEngine, worker_id: str) -> list[tuple[Worker, list[int]]]:
    """Declare dead every worker of this host whose process is gone, so that their shards are taken
    over now rather than when their leases run out. Returns them with the shards they held."""
    found = []
    for other in store.running_workers_on(db, host_name()):
        if other.id != worker_id and certainly_dead(other):
            found.append((other, store.declare_dead(db, other.id, found_by=worker_id,
                                                    why=f"process {other.pid} is gone")))
    return found


def worker_state(worker: Worker, *, heartbeat_age_s: float, stale_after_s: float) -> WorkerState:
    if worker.status == WorkerStatus.STOPPED:
        return WorkerState.STOPPED
    if worker.status == WorkerStatus.DEAD or certainly_dead(worker):
        return WorkerState.DEAD
    return WorkerState.STALE if heartbeat_age_s > stale_after_s else WorkerState.LIVE


def holder_is_live(held: HeldShard, now: datetime) -> bool:
    """Whether the holder of a leased shard is working on it: it renewed the lease within half of
    the lease's length (it renews every quarter), and, on this host, its process still runs. A
    process that exists but does not renew (stopped, hung) is not live: its lease will run out."""
    holder = held.holder
    if holder is None or held.lease_expires_at is None or held.heartbeat_at is None:
        return False
    if on_this_host(holder) and process_gone(holder.pid, holder.process_started_at):
        return False
    lease_s = (held.lease_expires_at - held.heartbeat_at).total_seconds()
    return (now - held.heartbeat_at).total_seconds() < lease_s / 2


def describe_wait(held: HeldShard, now: datetime) -> str:
    """Why a shard is not claimable yet, and from when it is: one line for the operator."""
    where = f"shard {held.shard_index} of job {held.job_id}"
    if held.status == ShardStatus.PENDING and held.next_try_at is not None:
        return f"{where} waits to be retried at {held.next_try_at:%H:%M:%S} UTC (in {_until(held.next_try_at, now)})"
    seen = f"last heartbeat {_since(held.heartbeat_at, now)} ago" if held.heartbeat_at else "no heartbeat"
    return (f"{where} is held by worker {held.worker_id} ({seen}); its lease runs out at "
            f"{held.lease_expires_at:%H:%M:%S} UTC (in {_until(held.lease_expires_at, now)}), then it is taken over")


def _until(moment: datetime, now: datetime) -> str:
    return f"{max((moment - now).total_seconds(), 0.0):.0f} s"


def _since(moment: datetime, now: datetime) -> str:
    return f"{max((now - moment).total_seconds(), 0.0):.0f} s"
