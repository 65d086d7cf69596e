"""Shard lease lifecycle: claim, heartbeat, progress, commit, release, fail.

Every function is one transaction. Every write by a lease holder is fenced: it names the shard's
attempt number it was granted, and the write is refused (LeaseLost) when the shard has since been
claimed again, so a worker presumed dead can never commit over its successor.
"""
from __future__ import annotations

from contextlib import contextmanager
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from typing import Callable, Iterator

from sqlalchemy import Engine, and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from jobrunner.store.events import EventKind
from jobrunner.store.models import (Checkpoint, Job, JobStatus, PartData, ResultPart, Shard, ShardStatus, Worker, WorkerStatus,
                                    utcnow)
from jobrunner.store.base import Lease, LeaseLost, add_event, get_job_locked, locked, read_tx, write_tx

ENGINE_FAILURE_LIMIT = 3  # a shard that crashes its worker this often fails the job


@dataclass(frozen=True, kw_only=True)
class RowProgress:
    """KV-free progress of one row: the tokens generated so far (and why it stopped, if it did)."""
    ids: tuple[int, ...]
    finish: str | None = None


@dataclass(frozen=True, kw_only=True)
class PartRecord:
    """A block's Parquet part, stored and registered with the shard's progress in one transaction."""
    path: str                 # the part's name: unique per (shard, attempt, block)
    data: bytes
    row_ids: tuple[int, ...]
    failed_rows: int
    generated_tokens: int
    size_bytes: int
    sha256: str
    block_seconds: float
    engine_stats: dict | None = None  # the block's measured figures (peak memory, transfers), for events


def claim_shard(engine: Engine, worker_id: str, *, lease_s: float, now: datetime | None = None) -> Lease | None:
    """Take the next claimable shard (pending, or leased with an expired lease) of a live job;
    highest job priority first, then oldest job, then input order. None when there is no work."""
    now = now or utcnow()
    with write_tx(engine) as s:
        _finish_abandoned_cancels(s, now)
        query = (select(Shard).join(Job, Job.id == Shard.job_id)
                 .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                        or_(and_(Shard.status == ShardStatus.PENDING,
                                 or_(Shard.next_try_at.is_(None), Shard.next_try_at <= now)),
                            and_(Shard.status == ShardStatus.LEASED, Shard.lease_expires_at < now)))
                 .order_by(Job.priority.desc(), Job.id, Shard.shard_index).limit(1))
        if s.get_bind().dialect.name == "postgresql":
            # Concurrent claimers skip each other's candidate instead of queueing behind it.
            query = query.with_for_update(skip_locked=True, of=Shard)
        shard = s.scalars(query).first()
        if shard is None:
            return None
        took_over = shard.status == ShardStatus.LEASED
        previous, previous_expiry = shard.worker_id, shard.lease_expires_at
        shard.status = ShardStatus.LEASED
        shard.attempt += 1
        shard.worker_id = worker_id
        shard.lease_expires_at = now + timedelta(seconds=lease_s)
        shard.heartbeat_at = now
        shard.updated_at = now
        job = get_job_locked(s, shard.job_id)
        if job.status == JobStatus.QUEUED:
            job.status = JobStatus.RUNNING
            job.started_at = job.started_at or now
            add_event(s, EventKind.JOB_STARTED, job_id=job.id, worker_id=worker_id)
        job.updated_at = now
        s.execute(update(Worker).where(Worker.id == worker_id)
                  .values(current_shard_id=shard.id, last_seen_at=now))
        if took_over:
            _record_takeover(s, shard, previous, previous_expiry, now)
        add_event(s, EventKind.SHARD_CLAIMED, job_id=job.id, shard_id=shard.id, worker_id=worker_id,
                  data={"attempt": shard.attempt, "shard_index": shard.shard_index})
        return Lease(shard_id=shard.id, job_id=job.id, shard_index=shard.shard_index,
                     attempt=shard.attempt, worker_id=worker_id, row_start=shard.row_start,
                     row_end=shard.row_end, expires_at=shard.lease_expires_at, took_over=took_over)


def _record_takeover(s: Session, shard: Shard, previous: str | None, expired_at: datetime | None,
                     now: datetime) -> None:
    """The event of a takeover: from a worker found dead (at once), or after its lease ran out."""
    holder = s.get(Worker, previous) if previous else None
    dead = holder is not None and holder.status == WorkerStatus.DEAD
    why = ("its process is gone" if dead else
           f"its lease ran out {(now - expired_at).total_seconds():.0f} s ago" if expired_at else "its lease ran out")
    add_event(s, EventKind.WORKER_DEAD if dead else EventKind.LEASE_EXPIRED, job_id=shard.job_id, shard_id=shard.id,
              worker_id=shard.worker_id,
              message=f"took over shard {shard.shard_index} (attempt {shard.attempt}) from worker {previous}: {why}",
              data={"previous_worker": previous, "attempt": shard.attempt, "shard_index": shard.shard_index,
                    "holder_dead": dead})


def _fenced_shard(s: Session, lease: Lease) -> Shard:
    shard = s.scalars(locked(s, select(Shard).where(Shard.id == lease.shard_id))).one()
    if shard.status != ShardStatus.LEASED or shard.attempt != lease.attempt or shard.worker_id != lease.worker_id:
        raise LeaseLost(f"shard {shard.shard_index} of job {shard.job_id}: lease attempt {lease.attempt} "
                        f"is no longer valid (shard is {shard.status.value}, attempt {shard.attempt})")
    return shard


@contextmanager
def _fenced_write(engine: Engine, lease: Lease, write: str) -> Iterator[Session]:
    """A lease holder's write transaction. A write refused by fencing is rolled back and logged in a
    transaction of its own (a WRITE_FENCED event: the proof that a superseded holder wrote nothing)."""
    try:
        with write_tx(engine) as s:
            yield s
    except LeaseLost as exc:
        with write_tx(engine) as s:
            add_event(s, EventKind.WRITE_FENCED, job_id=lease.job_id, shard_id=lease.shard_id,
                      worker_id=lease.worker_id, message=f"{write} refused: {exc}",
                      data={"write": write, "attempt": lease.attempt, "shard_index": lease.shard_index})
        raise


def heartbeat(engine: Engine, lease: Lease, *, lease_s: float, now: datetime | None = None) -> JobStatus:
    """Renew the lease; returns the job's status so the worker notices a cancel. Raises LeaseLost."""
    now = now or utcnow()
    with _fenced_write(engine, lease, "heartbeat") as s:
        shard = _fenced_shard(s, lease)
        shard.lease_expires_at = now + timedelta(seconds=lease_s)
        shard.heartbeat_at = now
        s.execute(update(Worker).where(Worker.id == lease.worker_id).values(last_seen_at=now))
        return s.scalars(select(Job.status).where(Job.id == lease.job_id)).one()


def save_progress(engine: Engine, lease: Lease, rows: dict[int, RowProgress], *, decode_step: int) -> None:
    """Replace the shard's KV-free checkpoint with the generated ids of its rows in flight."""
    now = utcnow()
    payload = {str(r): {"ids": list(p.ids), "finish": p.finish} for r, p in rows.items()}
    with _fenced_write(engine, lease, "progress save") as s:
        _fenced_shard(s, lease)
        checkpoint = s.get(Checkpoint, lease.shard_id)
        if checkpoint is None:
            s.add(Checkpoint(shard_id=lease.shard_id, attempt=lease.attempt, rows=payload,
                             sha256=_seal(payload), decode_step=decode_step, saved_at=now))
        else:
            checkpoint.attempt, checkpoint.rows, checkpoint.sha256 = lease.attempt, payload, _seal(payload)
            checkpoint.decode_step, checkpoint.saved_at = decode_step, now


def _seal(rows: dict) -> str:
    """The checkpoint's checksum: sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _checkpoint_problem(checkpoint: Checkpoint) -> str | None:
    if checkpoint.sha256 is not None and _seal(checkpoint.rows) != checkpoint.sha256:
        return "checksum mismatch"
    for row, saved in checkpoint.rows.items():
        ids = saved.get("ids") if isinstance(saved, dict) else None
        if not row.isdigit() or not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids) \
                or saved.get("finish") not in (None, "stop", "length"):
            return f"row {row!r} is malformed"
    return None


def load_progress(engine: Engine, shard_id: int) -> dict[int, RowProgress]:
    """The saved in-flight rows of a shard (possibly from an earlier attempt): row -> progress.
    A damaged checkpoint is never resumed from: it is dropped, with a checkpoint_damaged event,
    and its rows are generated again from their prompts."""
    with read_tx(engine) as s:
        checkpoint = s.get(Checkpoint, shard_id)
        if checkpoint is None:
            return {}
        problem = _checkpoint_problem(checkpoint)
        if problem is None:
            return {int(r): RowProgress(ids=tuple(v["ids"]), finish=v.get("finish"))
                    for r, v in checkpoint.rows.items()}
    with write_tx(engine) as s:
        shard = s.get(Shard, shard_id)
        s.execute(delete(Checkpoint).where(Checkpoint.shard_id == shard_id))
        add_event(s, EventKind.CHECKPOINT_DAMAGED, job_id=shard.job_id, shard_id=shard_id,
                  message=f"saved progress of shard {shard.shard_index} is damaged ({problem}); its rows start over",
                  data={"problem": problem})
    return {}


def committed_rows(engine: Engine, shard_id: int) -> set[int]:
    """Input rows of a shard that already have a registered result part."""
    with read_tx(engine) as s:
        done: set[int] = set()
        for row_ids in s.scalars(select(ResultPart.row_ids).where(ResultPart.shard_id == shard_id)):
            done.update(row_ids)
        return done


def commit_block(engine: Engine, lease: Lease, part: PartRecord, *,
                 before_commit: Callable[[], None] | None = None) -> bool:
    """Store and register a part and advance the shard and job counts in one transaction.
    Returns True when this completed the shard. Raises LeaseLost if the lease was superseded.
    Committing the same part again (a retry after a lost connection) changes nothing.
    `before_commit` runs inside the transaction, after every write (a crash-test hook)."""
    now = utcnow()
    with _fenced_write(engine, lease, "commit") as s:
        registered = s.scalars(select(ResultPart.id).where(ResultPart.shard_id == lease.shard_id,
                                                           ResultPart.attempt == lease.attempt,
                                                           ResultPart.path == part.path)).first()
        if registered is not None:  # a retry of a commit that went in but whose answer was lost
            return s.get(Shard, lease.shard_id).status == ShardStatus.DONE
        shard = _fenced_shard(s, lease)
        # The job row is locked before the inserts below, whose foreign keys take a share lock on
        # it: two commits that each held that share lock and then asked for the row lock deadlocked.
        job = get_job_locked(s, lease.job_id)
        already = set()
        for row_ids in s.scalars(select(ResultPart.row_ids).where(ResultPart.shard_id == shard.id)):
            already.update(row_ids)
        overlap = already.intersection(part.row_ids)
        if overlap:  # a bug, not a race (fencing prevents races): never register a row twice
            raise RuntimeError(f"rows {sorted(overlap)[:5]} of shard {shard.shard_index} already committed")
        registered = ResultPart(job_id=lease.job_id, shard_id=shard.id, attempt=lease.attempt, path=part.path,
                                num_rows=len(part.row_ids), failed_rows=part.failed_rows,
                                generated_tokens=part.generated_tokens, size_bytes=part.size_bytes,
                                sha256=part.sha256, row_ids=list(part.row_ids),
                                block_seconds=part.block_seconds, created_at=now)
        s.add(registered)
        s.flush()
        s.execute(insert(PartData).values(part_id=registered.id, data=part.data))
        shard.done_rows += len(part.row_ids)
        shard.failed_rows += part.failed_rows
        shard.updated_at = now
        checkpoint = s.get(Checkpoint, shard.id)
        if checkpoint is not None:
            committed = {str(r) for r in part.row_ids}
            checkpoint.rows = {r: v for r, v in checkpoint.rows.items() if r not in committed}
            checkpoint.sha256 = _seal(checkpoint.rows)
        job.done_rows += len(part.row_ids)
        job.failed_rows += part.failed_rows
        job.generated_tokens += part.generated_tokens
        job.updated_at = now
        s.execute(update(Worker).where(Worker.id == lease.worker_id).values(
            last_seen_at=now, rows_done=Worker.rows_done + len(part.row_ids),
            tokens_generated=Worker.tokens_generated + part.generated_tokens))
        add_event(s, EventKind.BLOCK_COMMITTED, job_id=job.id, shard_id=shard.id, worker_id=lease.worker_id,
                  data={"rows": len(part.row_ids), "failed": part.failed_rows,
                        "tokens": part.generated_tokens, "seconds": part.block_seconds,
                        "attempt": lease.attempt} | (part.engine_stats or {}))
        finished = shard.done_rows >= shard.row_end - shard.row_start
        if finished:
            shard.status = ShardStatus.DONE
            shard.lease_expires_at = None
            if checkpoint is not None:
                s.delete(checkpoint)
            _complete_job_if_done(s, job, now)
        if before_commit is not None:
            before_commit()
        return finished


def _complete_job_if_done(s: Session, job: Job, now: datetime) -> None:
    s.flush()
    open_shards = s.scalars(select(Shard.id).where(Shard.job_id == job.id,
                                                   Shard.status != ShardStatus.DONE).limit(1)).first()
    if open_shards is None and job.status in (JobStatus.RUNNING, JobStatus.QUEUED):
        job.status = JobStatus.COMPLETED
        job.finished_at = now
        add_event(s, EventKind.JOB_COMPLETED, job_id=job.id,
                  data={"rows": job.done_rows, "failed": job.failed_rows})


def release_shard(engine: Engine, lease: Lease, *, reason: str, error: str | None = None,
                  retry_after_s: float = 0.0) -> None:
    """Give a shard back (SIGTERM, cancel, or a crash of the block): its checkpoint stays for the
    next claim. With `error`, count an engine failure; past the limit the shard and job fail."""
    now = utcnow()
    with _fenced_write(engine, lease, "release") as s:
        shard = _fenced_shard(s, lease)
        job = get_job_locked(s, lease.job_id)
        shard.worker_id, shard.lease_expires_at, shard.updated_at = None, None, now
        s.execute(update(Worker).where(Worker.id == lease.worker_id).values(current_shard_id=None))
        if job.status == JobStatus.CANCELLING:
            shard.status = ShardStatus.CANCELLED
            add_event(s, EventKind.SHARD_RELEASED, job_id=job.id, shard_id=shard.id, worker_id=lease.worker_id,
                      message="cancelled")
            _finish_cancel_if_done(s, job, now)
            return
        shard.status = ShardStatus.PENDING
        if error is not None:
            shard.engine_failures += 1
            shard.error = error
            shard.next_try_at = now + timedelta(seconds=retry_after_s)
            if shard.engine_failures >= ENGINE_FAILURE_LIMIT:
                shard.status = ShardStatus.FAILED
                _fail_job(s, job, f"shard {shard.shard_index} failed {shard.engine_failures} times: {error}", now)
        if job.status == JobStatus.RUNNING and job.done_rows == 0 and not _has_leased_shards(s, job.id):
            job.status = JobStatus.QUEUED  # nothing done and nobody on it: back to waiting
        add_event(s, EventKind.SHARD_RELEASED, job_id=job.id, shard_id=shard.id, worker_id=lease.worker_id,
                  message=reason, data={"error": error} if error else None)


def fail_job_for_lease(engine: Engine, lease: Lease, error: str) -> None:
    """A problem no retry can fix (input or model changed): fail the job, naming the cause."""
    now = utcnow()
    with _fenced_write(engine, lease, "job failure") as s:
        shard = _fenced_shard(s, lease)
        shard.status, shard.error, shard.worker_id, shard.lease_expires_at = ShardStatus.FAILED, error, None, None
        _fail_job(s, get_job_locked(s, lease.job_id), error, now)


def _fail_job(s: Session, job: Job, error: str, now: datetime) -> None:
    job.status, job.error, job.finished_at, job.updated_at = JobStatus.FAILED, error, now, now
    add_event(s, EventKind.JOB_FAILED, job_id=job.id, message=error)


def _has_leased_shards(s: Session, job_id: int) -> bool:
    s.flush()
    return s.scalars(select(Shard.id).where(Shard.job_id == job_id,
                                            Shard.status == ShardStatus.LEASED).limit(1)).first() is not None


def _finish_cancel_if_done(s: Session, job: Job, now: datetime) -> None:
    if not _has_leased_shards(s, job.id):
        job.status, job.finished_at, job.updated_at = JobStatus.CANCELLED, now, now
        add_event(s, EventKind.JOB_CANCELLED, job_id=job.id)


def _finish_abandoned_cancels(s: Session, now: datetime) -> None:
    """A cancelling job whose worker died would wait forever: expire its stale leases."""
    for job in s.scalars(select(Job).where(Job.status == JobStatus.CANCELLING)):
        s.execute(update(Shard).where(Shard.job_id == job.id, Shard.status == ShardStatus.LEASED,
                                      Shard.lease_expires_at < now).values(status=ShardStatus.CANCELLED))
        _finish_cancel_if_done(s, job, now)
