"""Jobs and events: every state change, one function (one transaction) each.

Functions return detached ORM snapshots (read them, do not modify them).

    enqueue_job       create a job, its shards and their stored prompts, or return the same existing job
    shard_input       a shard's stored prompts (Parquet bytes and sha256)
    part_bytes        a result part's stored Parquet bytes
    get_job           one job by id
    list_jobs         jobs, newest first, optionally by status
    list_shards       a job's shards in input order
    job_parts         a job's registered result parts, in shard then commit order
    failed_row_parts  ids of parts that hold error rows (for `retry --failed-rows`)
    drop_parts        unregister parts (missing/corrupt, or to redo failed rows) and reopen their shards
    cancel_job        stop a job: pending shards cancelled, leased ones stop at their next heartbeat
    retry_job         reopen a failed or cancelled job's unfinished shards
    record_event      append an event (re-plan, warnings, ...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import Engine, insert, select, update

from jobrunner.errors import UserError
from jobrunner.store.events import EventKind
from jobrunner.store.models import Job, JobStatus, PartData, ResultPart, Shard, ShardInput, ShardStatus, utcnow
from jobrunner.store.base import add_event, get_job_locked, read_tx, write_tx


@dataclass(frozen=True, kw_only=True)
class NewJob:
    """Everything `enqueue_job` records; `job_key` covers every field that changes the output."""
    name: str
    priority: int
    job_key: str
    input_path: str
    input_fingerprint: str
    input_size: int
    input_mtime_ns: int
    prompt_column: str
    id_column: str | None
    model_dir: str
    model_fingerprint: str
    params: dict
    results_dir: str
    shard_rows: int
    total_rows: int


def enqueue_job(engine: Engine, new: NewJob, *, shard_inputs: Iterable[tuple[bytes, str]] | None = None,
                force: bool = False) -> tuple[Job, bool]:
    """(job, created). Without `force`, an existing job with the same key is returned instead.
    `shard_inputs` yields each shard's prompts as (Parquet bytes, sha256), in shard order; they are
    written in the same transaction, one row at a time, so memory holds one shard's bytes."""
    now = utcnow()
    with write_tx(engine) as s:
        if not force:
            existing = s.scalars(select(Job).where(Job.job_key == new.job_key).order_by(Job.id.desc())).first()
            if existing is not None:
                return existing, False
        job = Job(name=new.name, priority=new.priority, job_key=new.job_key, input_path=new.input_path,
                  input_fingerprint=new.input_fingerprint, input_size=new.input_size,
                  input_mtime_ns=new.input_mtime_ns, prompt_column=new.prompt_column,
                  id_column=new.id_column, model_dir=new.model_dir, model_fingerprint=new.model_fingerprint,
                  params=new.params, results_dir=new.results_dir, shard_rows=new.shard_rows,
                  total_rows=new.total_rows, status=JobStatus.QUEUED, done_rows=0, failed_rows=0,
                  generated_tokens=0, created_at=now, updated_at=now, inputs_in_store=shard_inputs is not None)
        s.add(job)
        s.flush()
        if "{job}" in job.results_dir:
            job.results_dir = job.results_dir.replace("{job}", str(job.id))
        shards = [Shard(job_id=job.id, shard_index=i, row_start=start,
                        row_end=min(start + new.shard_rows, new.total_rows), status=ShardStatus.PENDING,
                        attempt=0, done_rows=0, failed_rows=0, engine_failures=0, updated_at=now)
                  for i, start in enumerate(range(0, new.total_rows, new.shard_rows))]
        s.add_all(shards)
        s.flush()
        if shard_inputs is not None:
            stored = 0
            for shard, (data, sha256) in zip(shards, shard_inputs):
                s.execute(insert(ShardInput).values(shard_id=shard.id, data=data, sha256=sha256))
                stored += 1
            if stored != len(shards):
                raise RuntimeError(f"{stored} shard inputs for {len(shards)} shards")
        add_event(s, EventKind.JOB_ENQUEUED, job_id=job.id, data={"rows": new.total_rows, "forced": force})
        return job, True


def shard_input(engine: Engine, shard_id: int) -> tuple[bytes, str] | None:
    """(Parquet bytes, sha256) of the shard's prompts; None for a job that reads its input file."""
    with read_tx(engine) as s:
        row = s.execute(select(ShardInput.data, ShardInput.sha256).where(ShardInput.shard_id == shard_id)).first()
        return None if row is None else (bytes(row.data), row.sha256)


def part_bytes(engine: Engine, part_id: int) -> bytes | None:
    """The part's Parquet bytes; None for a part stored as a file under the job's results_dir."""
    with read_tx(engine) as s:
        data = s.scalar(select(PartData.data).where(PartData.part_id == part_id))
        return None if data is None else bytes(data)


def get_job(engine: Engine, job_id: int) -> Job:
    with read_tx(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise UserError(f"no job {job_id}", "list jobs with `flexjob jobs`")
        return job


def list_jobs(engine: Engine, *, statuses: list[JobStatus] | None = None, limit: int | None = None) -> list[Job]:
    query = select(Job).order_by(Job.id.desc())
    if statuses:
        query = query.where(Job.status.in_(statuses))
    if limit:
        query = query.limit(limit)
    with read_tx(engine) as s:
        return list(s.scalars(query))


def list_shards(engine: Engine, job_id: int) -> list[Shard]:
    with read_tx(engine) as s:
        return list(s.scalars(select(Shard).where(Shard.job_id == job_id).order_by(Shard.shard_index)))


def job_parts(engine: Engine, job_id: int) -> list[ResultPart]:
    with read_tx(engine) as s:
        return list(s.scalars(select(ResultPart).join(Shard, Shard.id == ResultPart.shard_id)
                              .where(ResultPart.job_id == job_id)
                              .order_by(Shard.shard_index, ResultPart.id)))


def drop_parts(engine: Engine, job_id: int, part_ids: list[int], *, reason: str) -> int:
    """Unregister parts so their rows are generated again; their shards become pending.
    Returns the number of rows reopened."""
    now = utcnow()
    reopened = 0
    with write_tx(engine) as s:
        job = get_job_locked(s, job_id)
        if job.status in (JobStatus.RUNNING, JobStatus.CANCELLING):
            raise UserError(f"job {job_id} is {job.status.value}", "cancel it or wait for it to finish first")
        for part in s.scalars(select(ResultPart).where(ResultPart.job_id == job_id, ResultPart.id.in_(part_ids))):
            shard = s.get(Shard, part.shard_id)
            shard.done_rows -= part.num_rows
            shard.failed_rows -= part.failed_rows
            shard.status, shard.updated_at = ShardStatus.PENDING, now
            job.done_rows -= part.num_rows
            job.failed_rows -= part.failed_rows
            job.generated_tokens -= part.generated_tokens
            reopened += part.num_rows
            s.delete(part)
        if reopened:
            job.status, job.finished_at, job.error, job.updated_at = JobStatus.QUEUED, None, None, now
            add_event(s, EventKind.PARTS_DROPPED, job_id=job_id, message=reason, data={"rows": reopened})
    return reopened


def cancel_job(engine: Engine, job_id: int) -> Job:
    """Pending shards are cancelled now; a job with leased shards is `cancelling` until their
    workers notice (next heartbeat) or their leases expire."""
    now = utcnow()
    with write_tx(engine) as s:
        job = get_job_locked(s, job_id)
        if job.status.finished:
            raise UserError(f"job {job_id} is already {job.status.value}", "nothing to cancel")
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.PENDING)
                  .values(status=ShardStatus.CANCELLED, updated_at=now))
        leased = s.scalars(select(Shard.id).where(Shard.job_id == job_id, Shard.status == ShardStatus.LEASED,
                                                  Shard.lease_expires_at >= now).limit(1)).first()
        s.execute(update(Shard).where(Shard.job_id == job_id, Shard.status == ShardStatus.LEASED,
                                      Shard.lease_expires_at < now).values(status=ShardStatus.CANCELLED))
        job.cancel_requested_at, job.updated_at = now, now
        if leased is None:
            job.status, job.finished_at = JobStatus.CANCELLED, now
        else:
            job.status = JobStatus.CANCELLING
        add_event(s, EventKind.JOB_CANCEL, job_id=job_id, message=job.status.value)
        return job


def retry_job(engine: Engine, job_id: int) -> Job:
    """Reopen a failed or cancelled job: its unfinished shards become pending (their checkpoints
    and committed parts are kept, so nothing done is redone)."""
    now = utcnow()
    with write_tx(engine) as s:
        job = get_job_locked(s, job_id)
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED):
            raise UserError(f"job {job_id} is {job.status.value}; only failed or cancelled jobs can be retried",
                            "use `flexjob retry JOB --failed-rows` to redo the error rows of a completed job"
                            if job.status == JobStatus.COMPLETED else "cancel it first")
        s.execute(update(Shard).where(Shard.job_id == job_id,
                                      Shard.status.in_([ShardStatus.FAILED, ShardStatus.CANCELLED]))
                  .values(status=ShardStatus.PENDING, engine_failures=0, error=None, next_try_at=None,
                          updated_at=now))
        job.status, job.error, job.finished_at, job.cancel_requested_at = JobStatus.QUEUED, None, None, None
        job.updated_at = now
        add_event(s, EventKind.JOB_RETRY, job_id=job_id)
        return job


def failed_row_parts(engine: Engine, job_id: int) -> list[int]:
    """Ids of the parts that hold error rows (to drop for `retry --failed-rows`)."""
    with read_tx(engine) as s:
        return list(s.scalars(select(ResultPart.id).where(ResultPart.job_id == job_id,
                                                           ResultPart.failed_rows > 0)))


def record_event(engine: Engine, kind: EventKind, *, job_id: int | None = None, shard_id: int | None = None,
                 worker_id: str | None = None, message: str = "", data: dict | None = None) -> None:
    with write_tx(engine) as s:
        add_event(s, kind, job_id=job_id, shard_id=shard_id, worker_id=worker_id, message=message, data=data)
