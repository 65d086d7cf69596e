"""The read queries behind `flexjob status` and `flexjob report`: one read transaction each.

Reading only: no migration, no lock. SQLite WAL readers never block a worker's commit; PostgreSQL
gets a read-only REPEATABLE READ snapshot, so every figure of one status screen is of one moment.
Results are detached ORM snapshots (read them, do not modify them); jobrunner.observe formats them.

    open_store_for_reading   an existing store at this code's schema (never creates or migrates)
    read_status              jobs, shard counts, workers with their current work, recent events
    read_job_events          one job and its whole event log, oldest first
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from jobrunner.errors import UserError
from jobrunner.store.base import read_tx
from jobrunner.store.db import describe_url, head_revision, open_store, schema_revision
from jobrunner.store.events import EventKind
from jobrunner.store.models import Event, Job, JobStatus, ResultPart, Shard, ShardStatus, Worker, WorkerStatus

UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)


@dataclass(frozen=True, kw_only=True)
class StatusQuery:
    now: datetime
    job_id: int | None            # one job: its row, its workers, its events
    job_limit: int                # unfinished jobs always; finished ones fill up to this
    event_limit: int
    event_kinds: tuple[EventKind, ...]
    recent_since: datetime        # committed blocks since then (recent speed, ETA)
    worker_blocks: int            # each worker's latest blocks (bandwidth, memory peaks)
    seen_since: datetime          # running workers last seen before this are left out
    stopped_since: datetime       # stopped or dead workers that ended before this are left out


@dataclass(frozen=True, kw_only=True)
class CurrentWork:
    shard: Shard
    job_name: str | None
    blocks_done: int              # parts this attempt registered


@dataclass(frozen=True, kw_only=True)
class WorkerView:
    worker: Worker
    current: CurrentWork | None
    lost: Shard | None            # the shard it last claimed, since taken over by another worker
    blocks: list[Event]           # its latest block_committed events, newest first
    last_replan: Event | None


@dataclass(frozen=True, kw_only=True)
class StatusData:
    jobs: list[Job]                                   # newest first
    shard_counts: dict[int, dict[ShardStatus, int]]   # job id -> status -> shards
    expired_leases: dict[int, int]                    # job id -> leased shards whose lease ran out
    recent_blocks: list[Event]
    workers: list[WorkerView]                         # newest first
    events: list[Event]                               # newest first


def open_store_for_reading(db: str | None) -> Engine:
    """An Engine on an existing store at the current schema; never creates or migrates anything."""
    engine = open_store(db, migrate=False, must_exist=True)
    shown = describe_url(engine)
    current = schema_revision(engine)
    if current is None:
        raise UserError(f"{shown} is not a flexjob job store (no schema)",
                        "point --db / FLEXJOB_DB at the store the workers use")
    if current != head_revision():
        raise UserError(f"job store {shown} has schema {current}; this flexjob expects {head_revision()}",
                        "use the flexjob version the workers run (`flexjob jobs` upgrades an older store)")
    return engine


def read_status(engine: Engine, query: StatusQuery) -> StatusData:
    reader = engine
    if engine.dialect.name == "postgresql":
        reader = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    with Session(reader, expire_on_commit=False) as s, s.begin():
        jobs = _jobs(s, query)
        if query.job_id is not None and not jobs:
            raise UserError(f"no job {query.job_id}", "list jobs with `flexjob jobs`")
        ids = [j.id for j in jobs]
        counts: dict[int, dict[ShardStatus, int]] = defaultdict(lambda: {st: 0 for st in ShardStatus})
        for job_id, status, count in s.execute(select(Shard.job_id, Shard.status, func.count())
                                               .where(Shard.job_id.in_(ids)).group_by(Shard.job_id, Shard.status)):
            counts[job_id][status] = count
        expired = dict(s.execute(select(Shard.job_id, func.count())
                                 .where(Shard.job_id.in_(ids), Shard.status == ShardStatus.LEASED,
                                        Shard.lease_expires_at < query.now).group_by(Shard.job_id)).all())
        recent = select(Event).where(Event.kind == EventKind.BLOCK_COMMITTED, Event.created_at >= query.recent_since)
        events = (select(Event).where(Event.kind.in_(query.event_kinds)).order_by(Event.id.desc())
                  .limit(query.event_limit))
        if query.job_id is not None:
            recent, events = recent.where(Event.job_id == query.job_id), events.where(Event.job_id == query.job_id)
        return StatusData(jobs=jobs, shard_counts={i: counts[i] for i in ids}, expired_leases=expired,
                          recent_blocks=list(s.scalars(recent)), workers=_workers(s, query),
                          events=list(s.scalars(events)))


def _jobs(s: Session, query: StatusQuery) -> list[Job]:
    if query.job_id is not None:
        job = s.get(Job, query.job_id)
        return [job] if job is not None else []
    unfinished = list(s.scalars(select(Job).where(Job.status.in_(UNFINISHED))))
    room = max(query.job_limit - len(unfinished), 0)
    finished = list(s.scalars(select(Job).where(Job.status.not_in(UNFINISHED)).order_by(Job.id.desc())
                              .limit(room))) if room else []
    return sorted(unfinished + finished, key=lambda j: j.id, reverse=True)


def _workers(s: Session, query: StatusQuery) -> list[WorkerView]:
    listed = (select(Worker).where(((Worker.status == WorkerStatus.RUNNING) & (Worker.last_seen_at >= query.seen_since))
                                   | ((Worker.status != WorkerStatus.RUNNING)
                                      & (func.coalesce(Worker.stopped_at, Worker.last_seen_at) >= query.stopped_since)))
              .order_by(Worker.started_at.desc()))
    views = []
    for worker in s.scalars(listed):
        blocks = list(s.scalars(select(Event).where(Event.kind == EventKind.BLOCK_COMMITTED,
                                                    Event.worker_id == worker.id)
                                .order_by(Event.id.desc()).limit(query.worker_blocks)))
        replan = s.scalars(select(Event).where(Event.kind == EventKind.REPLAN, Event.worker_id == worker.id)
                           .order_by(Event.id.desc()).limit(1)).first()
        claimed = s.get(Shard, worker.current_shard_id) if worker.current_shard_id is not None else None
        lost = claimed if claimed is not None and claimed.worker_id not in (None, worker.id) else None
        views.append(WorkerView(worker=worker, current=_current_work(s, worker, claimed), lost=lost, blocks=blocks,
                                last_replan=replan))
    return views


def _current_work(s: Session, worker: Worker, shard: Shard | None) -> CurrentWork | None:
    if shard is None or worker.status != WorkerStatus.RUNNING or shard.worker_id != worker.id:
        return None
    job = s.get(Job, shard.job_id)
    blocks_done = s.scalar(select(func.count()).select_from(ResultPart)
                           .where(ResultPart.shard_id == shard.id, ResultPart.attempt == shard.attempt))
    return CurrentWork(shard=shard, job_name=job.name if job else None, blocks_done=blocks_done)


def read_job_events(engine: Engine, job_id: int) -> tuple[Job, list[Event]]:
    with read_tx(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}", "list jobs with `flexjob jobs`")
        return job, list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))
