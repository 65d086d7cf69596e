"""The job store's tables as SQLAlchemy 2.0 typed models.

The schema is created and changed only by the Alembic migrations in `migrations/`; these classes
describe it for queries. Every state change goes through `jobrunner.store` (one function = one
transaction); nothing else writes these tables.

Times are naive UTC datetimes written by the Python side (`utcnow()`), so SQLite and PostgreSQL
compare leases the same way. Statuses are stored as their lowercase string values.
"""
from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Enum, Float, ForeignKey, Index, Integer, LargeBinary,
                        String, Text)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from jobrunner.store.events import EventKind


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"          # enqueued, no shard claimed yet
    RUNNING = "running"        # at least one shard claimed once
    COMPLETED = "completed"    # every row has a result (some may be error rows)
    FAILED = "failed"          # stopped by a problem that is not a row's (input changed, model changed, ...)
    CANCELLING = "cancelling"  # cancel asked while a worker holds a shard; it stops at its next step
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class ShardStatus(str, enum.Enum):
    PENDING = "pending"      # claimable (possibly with saved progress from an earlier attempt)
    LEASED = "leased"        # a worker holds it until lease_expires_at (renewed by heartbeats)
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WorkerStatus(str, enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    DEAD = "dead"        # its process was found gone and its shard taken over


def _enum(cls: type[enum.Enum], length: int = 20) -> Enum:
    # VARCHAR rather than a native enum type: the same migration runs on SQLite and PostgreSQL.
    return Enum(cls, native_enum=False, length=length, values_callable=lambda e: [m.value for m in e],
                validate_strings=True)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # The idempotency key: sha256 of input fingerprint + model fingerprint + every output-changing parameter.
    job_key: Mapped[str] = mapped_column(String(64), index=True)
    input_path: Mapped[str] = mapped_column(Text)
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    input_size: Mapped[int] = mapped_column(BigInteger)
    input_mtime_ns: Mapped[int] = mapped_column(BigInteger)
    prompt_column: Mapped[str] = mapped_column(String(200))
    id_column: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model_dir: Mapped[str] = mapped_column(Text)
    model_fingerprint: Mapped[str] = mapped_column(String(64))
    # Output-changing parameters (JobParams.to_dict): sampling, seed, dtype, stop, truncation.
    params: Mapped[dict] = mapped_column(JSON)
    # Where result part files of a job enqueued without `inputs_in_store` live; unused otherwise.
    results_dir: Mapped[str] = mapped_column(Text)
    # The prompts were copied into `shard_inputs` at enqueue, and parts are stored in `part_data`:
    # workers and `results` then need nothing but the database.
    inputs_in_store: Mapped[bool] = mapped_column(Boolean, default=False)
    shard_rows: Mapped[int] = mapped_column(Integer)
    total_rows: Mapped[int] = mapped_column(BigInteger)
    done_rows: Mapped[int] = mapped_column(BigInteger, default=0)     # rows with a result, errors included
    failed_rows: Mapped[int] = mapped_column(BigInteger, default=0)   # rows whose result is an error
    generated_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Shard(Base):
    """A contiguous range of input rows [row_start, row_end): the unit a worker claims."""
    __tablename__ = "shards"
    __table_args__ = (Index("ix_shards_claim", "status", "job_id", "shard_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    shard_index: Mapped[int] = mapped_column(Integer)
    row_start: Mapped[int] = mapped_column(BigInteger)
    row_end: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[ShardStatus] = mapped_column(_enum(ShardStatus), default=ShardStatus.PENDING)
    # The fencing token: incremented by every claim; every write names the attempt it belongs to.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    done_rows: Mapped[int] = mapped_column(Integer, default=0)
    failed_rows: Mapped[int] = mapped_column(Integer, default=0)
    engine_failures: Mapped[int] = mapped_column(Integer, default=0)
    next_try_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Checkpoint(Base):
    """KV-free progress of a shard: generated token ids of its rows in flight (no KV cache)."""
    __tablename__ = "checkpoints"

    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    # {"<row>": {"ids": [...], "finish": "stop" | "length" | null}}
    rows: Mapped[dict] = mapped_column(JSON)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)  # of `rows`' canonical JSON
    decode_step: Mapped[int] = mapped_column(Integer, default=0)
    saved_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ShardInput(Base):
    """A shard's prompts (and ids) as Parquet bytes, copied from the input file at enqueue."""
    __tablename__ = "shard_inputs"

    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))


class ResultPart(Base):
    """One Parquet table of finished rows (one engine block), registered with the shard's progress."""
    __tablename__ = "result_parts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    shard_id: Mapped[int] = mapped_column(ForeignKey("shards.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)           # the part's name (a file under results_dir without part_data)
    num_rows: Mapped[int] = mapped_column(Integer)
    failed_rows: Mapped[int] = mapped_column(Integer)
    generated_tokens: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    row_ids: Mapped[list] = mapped_column(JSON)       # input positions in this part
    block_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PartData(Base):
    """A part's Parquet bytes, written in the transaction that registers the part. A table of its
    own so that listing parts never loads their bytes."""
    __tablename__ = "part_data"

    part_id: Mapped[int] = mapped_column(ForeignKey("result_parts.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # Which machine and pid namespace (boot id, namespace): host names alone do not tell two machines
    # apart. With the pid and the process's start time (seconds since the epoch, as the OS reports
    # it) it names one process, so a pid reused by another process is not mistaken for the worker.
    host_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    process_started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The hardware profile (engine.planning's JSON store) the worker plans with, if any.
    profile_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    device: Mapped[str] = mapped_column(String(100))
    status: Mapped[WorkerStatus] = mapped_column(_enum(WorkerStatus), default=WorkerStatus.RUNNING)
    policy: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    current_shard_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rows_done: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Event(Base):
    """An append-only log: claims, commits, takeovers, re-plans, errors (for `status` and `report`)."""
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    kind: Mapped[EventKind] = mapped_column(_enum(EventKind, length=40), index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    shard_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class HardwareProfile(Base):
    """Unused: hardware profiles live in engine.planning's JSON store (`Worker.profile_path` points
    to the one a worker plans with). The table stays so that older stores keep their schema."""
    __tablename__ = "hardware_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    data: Mapped[dict] = mapped_column(JSON)
