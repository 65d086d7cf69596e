"""Workers: their lifecycle, and what a worker needs to know about the others to take work over.

    register_worker    a worker announces itself (host, pid, process start time, device, policy)
    worker_seen        a worker's liveness and policy update
    stop_worker        a worker exits cleanly
    running_workers_on the workers of one host name that claim to run (to check their processes)
    declare_dead       a worker whose process is gone: marked dead, its shards free at once
    held_elsewhere     unfinished shards of live jobs that this worker cannot claim yet, with their holders

Functions return detached ORM snapshots or frozen dataclasses; each is one transaction.
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, update

from jobrunner.store.base import add_event, locked, read_tx, write_tx
from jobrunner.store.events import EventKind
from jobrunner.store.models import Job, JobStatus, Shard, ShardStatus, Worker, WorkerStatus, utcnow


def register_worker(engine: Engine, *, device: str, policy: dict | None = None, host_id: str | None = None,
                    process_started_at: float | None = None, profile_path: str | None = None) -> str:
    """A new worker of this process; its id (host-pid-random) is its one name everywhere."""
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    now = utcnow()
    with write_tx(engine) as s:
        s.add(Worker(id=worker_id, hostname=socket.gethostname(), pid=os.getpid(), device=device,
                     status=WorkerStatus.RUNNING, policy=policy, rows_done=0, tokens_generated=0,
                     started_at=now, last_seen_at=now, host_id=host_id, process_started_at=process_started_at,
                     profile_path=profile_path))
        add_event(s, EventKind.WORKER_STARTED, worker_id=worker_id, data={"device": device})
    return worker_id


def worker_seen(engine: Engine, worker_id: str, *, policy: dict | None = None) -> None:
    values = {"last_seen_at": utcnow()} | ({"policy": policy} if policy is not None else {})
    with write_tx(engine) as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(**values))


def stop_worker(engine: Engine, worker_id: str, *, reason: str = "") -> None:
    now = utcnow()
    with write_tx(engine) as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(
            status=WorkerStatus.STOPPED, stopped_at=now, last_seen_at=now, current_shard_id=None))
        add_event(s, EventKind.WORKER_STOPPED, worker_id=worker_id, message=reason)


def running_workers_on(engine: Engine, hostname: str) -> list[Worker]:
    with read_tx(engine) as s:
        return list(s.scalars(select(Worker).where(Worker.hostname == hostname,
                                                   Worker.status == WorkerStatus.RUNNING)))


def declare_dead(engine: Engine, worker_id: str, *, found_by: str, why: str) -> list[int]:
    """Mark a running worker dead (its process is gone for certain) and end its leases now, so that
    the next claim takes its shards over; the claim's new attempt number fences the dead holder out.
    Returns the ids of the shards it held (none when it was not running any more)."""
    now = utcnow()
    with write_tx(engine) as s:
        worker = s.scalars(locked(s, select(Worker).where(Worker.id == worker_id))).first()
        if worker is None or worker.status != WorkerStatus.RUNNING:
            return []
        worker.status, worker.stopped_at = WorkerStatus.DEAD, now
        held = list(s.scalars(locked(s, select(Shard).where(Shard.worker_id == worker_id,
                                                             Shard.status == ShardStatus.LEASED))))
        for shard in held:
            shard.lease_expires_at = now
        add_event(s, EventKind.WORKER_STOPPED, worker_id=worker_id, message=f"dead: {why} (found by {found_by})",
                  data={"dead": True, "found_by": found_by,
                        "shards": [{"job_id": h.job_id, "shard_index": h.shard_index, "attempt": h.attempt}
                                   for h in held]})
        return [h.id for h in held]


@dataclass(frozen=True, kw_only=True)
class HeldShard:
    """An unfinished shard another worker holds, or one waiting out a retry delay."""
    job_id: int
    shard_index: int
    status: ShardStatus
    next_try_at: datetime | None        # pending: claimable from then
    worker_id: str | None               # leased: the holder ...
    lease_expires_at: datetime | None   # ... until then, unless it renews
    heartbeat_at: datetime | None       # its last renewal
    holder: Worker | None


def held_elsewhere(engine: Engine, worker_id: str, *, now: datetime | None = None) -> list[HeldShard]:
    """Shards of queued or running jobs that are leased by another worker, or pending but not
    claimable before their retry time: what is left to do once the claimable shards are gone."""
    now = now or utcnow()
    query = (select(Shard, Worker).join(Job, Job.id == Shard.job_id)
             .outerjoin(Worker, Worker.id == Shard.worker_id)
             .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                    ((Shard.status == ShardStatus.LEASED) & (Shard.worker_id != worker_id))
                    | ((Shard.status == ShardStatus.PENDING) & (Shard.next_try_at > now)))
             .order_by(Job.id, Shard.shard_index))
    with read_tx(engine) as s:
        return [HeldShard(job_id=shard.job_id, shard_index=shard.shard_index, status=shard.status,
                          next_try_at=shard.next_try_at, worker_id=shard.worker_id,
                          lease_expires_at=shard.lease_expires_at, heartbeat_at=shard.heartbeat_at, holder=holder)
                for shard, holder in s.execute(query)]
