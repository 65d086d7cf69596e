"""A chaos run over simulated machines, and what is checked and counted after it.

`run_chaos` keeps a fixed number of `flexjob work` processes on each machine while the jobs run,
SIGKILLs one every few seconds (mostly shard holders, so their shards are taken over) and now and
then SIGSTOPs a holder for longer than its lease, then SIGCONTs it (its shard goes to another
worker meanwhile; its late writes are fenced off). Afterwards `tally_store` counts what the store
logged, `generated_columns` reads `flexjob results` output without the columns that say when and
by which attempt a row was made.
"""
from __future__ import annotations

import random
from collections import Counter
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from tests.support import store_reads
from tests.support.machines import Machine

# Columns that differ between two correct runs: which attempt made a row, when, and how fast.
RUN_COLUMNS = ("attempt", "block_seconds", "finished_at")


@dataclass(frozen=True, kw_only=True)
class ChaosPlan:
    kills: int                          # SIGKILLs in all
    stalls: int                         # SIGSTOPs of a shard holder, spread between the kills
    stall_s: float                      # longer than the workers' lease; a stall ends at the takeover, at
                                        # the latest after STALL_CAP x stall_s
    gap_s: tuple[float, float]          # random wait between two kills
    holder_share: float = 0.8           # how often the victim must hold a shard (else: any worker)
    deadline_s: float = 900.0


STALL_CAP = 8  # a stall whose shard nobody takes over ends after this many times stall_s


@dataclass
class ChaosTally:
    kills: int = 0
    holder_kills: int = 0
    stalls: int = 0
    workers_started: int = 0
    seconds: float = 0.0
    victims: list[str] = field(default_factory=list)
    stall_ends: list[str] = field(default_factory=list)  # per stall: taken over, the cap, or the run's end


def holders(db, job_ids: list[int]) -> set[tuple[str, int]]:
    """(host name, pid in its namespace) of the workers that hold a shard of the jobs now."""
    from jobrunner import store
    from jobrunner.store.models import ShardStatus

    held = {s.worker_id for j in job_ids for s in store.list_shards(db, j) if s.status == ShardStatus.LEASED}
    return {(w.hostname, w.pid) for w in store_reads.workers(db) if w.id in held}


def holds_row_locks(db, host: str, pid: int) -> bool:
    """Whether the worker (host name, pid in its namespace) holds a lock on its worker row or on a
    shard it leases now: it is inside a write transaction (PostgreSQL; SQLite has no row locks)."""
    from sqlalchemy import select
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import Session

    from jobrunner.store.models import Shard, Worker

    if db.dialect.name != "postgresql":
        return False
    ids = [w.id for w in store_reads.workers(db) if (w.hostname, w.pid) == (host, pid)]
    with Session(db) as s:
        try:
            s.execute(select(Worker.id).where(Worker.id.in_(ids)).with_for_update(nowait=True)).all()
            s.execute(select(Shard.id).where(Shard.worker_id.in_(ids)).with_for_update(nowait=True)).all()
        except DBAPIError:
            return True
        finally:
            s.rollback()
    return False


def jobs_finished(db, job_ids: list[int]) -> bool:
    from jobrunner import store
    from jobrunner.store.models import JobStatus

    return all(store.get_job(db, j).status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
               for j in job_ids)


def run_chaos(db, job_ids: list[int], machines: list[tuple[Machine, int]], work_args: list[str],
              plan: ChaosPlan, rng: random.Random) -> ChaosTally:
    """Run workers on the machines (machine, how many) until the jobs finish, with the plan's faults."""
    # stalled: pid -> (worker, when it was stopped). A stalled holder is resumed once its
    # shard has been taken over: its next write (a heartbeat at least) must then be fenced. Workers
    # claim shards in job and shard order, so a lapsed lease on a later job waits for the earlier
    # job's pending shards: on a slow host the takeover can come minutes after the lease ran out. It
    # is not resumed before (resumed early, the holder would renew its lapsed lease and test no
    # fencing), nor long after (on a fast host the others may finish the jobs meanwhile, and a
    # worker resumed after the run may exit without a write); after STALL_CAP x stall_s it is
    # resumed anyway (a run that cannot take it over fails, it does not hang), and
    # `tally.stall_ends` says which way each stall ended.
    tally, stalled = ChaosTally(), {}
    started = time.monotonic()
    while not jobs_finished(db, job_ids) and time.monotonic() - started < plan.deadline_s:
        for machine, count in machines:
            while len(machine.running()) < count:
                machine.start_worker(*work_args)
                tally.workers_started += 1
        time.sleep(rng.uniform(*plan.gap_s))
        held = holders(db, job_ids) if stalled else set()
        for pid, (worker, since) in list(stalled.items()):
            waited = time.monotonic() - since
            taken_over = (worker.machine.name, worker.inner_pid) not in held  # it held a shard when stopped
            if taken_over or waited >= STALL_CAP * plan.stall_s:
                tally.stall_ends.append(f"taken over after {waited:.0f} s" if taken_over else f"cap ({waited:.0f} s)")
                worker.signal(signal.SIGCONT)
                del stalled[pid]
        running = [w for m, _ in machines for w in m.running() if w.pid not in stalled]
        held = holders(db, job_ids)
        busy = [w for w in running if (w.machine.name, w.inner_pid) in held]
        pool = busy if rng.random() < plan.holder_share else running  # no holder now: no kill this round
        if tally.kills < plan.kills and pool:
            victim = rng.choice(pool)
            tally.holder_kills += victim in busy
            tally.victims.append(f"{victim.machine.name}:{victim.inner_pid}{'*' if victim in busy else ''}")
            victim.kill()
            tally.kills += 1
            busy = [w for w in busy if w is not victim]
        due = tally.kills >= (tally.stalls + 1) * plan.kills // (plan.stalls + 1)
        if tally.stalls < plan.stalls and not stalled and busy and due:
            victim = rng.choice(busy)
            victim.signal(signal.SIGSTOP)
            victim.wait_stopped()
            time.sleep(0.5)  # a statement it sent just before it stopped (a shard's last commit) lands first
            # `busy` was read before the kill; a fast worker may have committed since. Stopped, it
            # cannot change the store, so this second look is final: a worker holding nothing is
            # resumed at once and another holder is stalled in a later round.
            # Stopped inside a write transaction, it would hold its rows' locks: the takeover waits
            # for them, and once resumed it finishes its write under a lease nobody took, so that
            # stall tests no fencing; it is resumed too.
            if ((victim.machine.name, victim.inner_pid) in holders(db, job_ids)
                    and not holds_row_locks(db, victim.machine.name, victim.inner_pid)):
                stalled[victim.pid] = (victim, time.monotonic())
                tally.stalls += 1
            else:
                victim.signal(signal.SIGCONT)
    for worker, since in stalled.values():
        tally.stall_ends.append(f"still stopped when the run ended ({time.monotonic() - since:.0f} s)")
        worker.signal(signal.SIGCONT)
    for machine, _ in machines:
        for worker in machine.running():
            worker.proc.wait(timeout=300)
    tally.seconds = time.monotonic() - started
    return tally


def tally_store(db, job_ids: list[int]) -> dict:
    """What the store logged of the run: takeovers by kind, writes refused by fencing, resumed work."""
    from jobrunner.store import EventKind

    def count(kind: EventKind) -> list:
        return [e for j in job_ids for e in store_reads.events(db, job_id=j, kinds=[kind])]

    fenced = count(EventKind.WRITE_FENCED)
    resumed = count(EventKind.SHARD_RESUMED)
    return {"takeovers_dead": len(count(EventKind.WORKER_DEAD)),
            "takeovers_expired": len(count(EventKind.LEASE_EXPIRED)),
            "fenced_writes": len(fenced),
            "fenced_commits": sum(1 for e in fenced if (e.data or {}).get("write") == "commit"),
            "fenced_by_write": dict(Counter((e.data or {}).get("write", "?") for e in fenced)),
            "resumed_shards": len(resumed),
            "resumed_tokens": sum((e.data or {}).get("tokens", 0) for e in resumed),
            "claims": len(count(EventKind.SHARD_CLAIMED))}


def orphaned_leases(db, job_ids: list[int]) -> list[str]:
    """Shards not done, or done with a lease still set: none after a finished run."""
    from jobrunner import store
    from jobrunner.store.models import ShardStatus

    return [f"job {j} shard {s.shard_index}: {s.status.value}" for j in job_ids for s in store.list_shards(db, j)
            if s.status != ShardStatus.DONE or s.lease_expires_at is not None]


def generated_columns(path: Path) -> list[dict]:
    """A `flexjob results` Parquet file's rows, without the columns of RUN_COLUMNS."""
    table = pq.read_table(path)
    return table.drop_columns([c for c in RUN_COLUMNS if c in table.column_names]).to_pylist()
