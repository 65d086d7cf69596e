"""Transactions and shared types of the store (see `jobrunner.store` for the API)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Iterator

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from jobrunner.store.db import write_engine
from jobrunner.errors import UserError
from jobrunner.store.events import EventKind
from jobrunner.store.models import Event, Job, utcnow


class LeaseLost(Exception):
    """The shard was taken over (lease expired) or cancelled: this worker must not write to it."""


@dataclass(frozen=True, kw_only=True)
class Lease:
    """A worker's claim on a shard. `attempt` is the fencing token carried by every write."""
    shard_id: int
    job_id: int
    shard_index: int
    attempt: int
    worker_id: str
    row_start: int
    row_end: int
    expires_at: datetime
    took_over: bool = False  # taken from another holder (found dead, or its lease had expired)


@contextmanager
def write_tx(engine: Engine) -> Iterator[Session]:
    """One write transaction (SQLite: BEGIN IMMEDIATE, so it waits for the lock up front)."""
    with Session(write_engine(engine), expire_on_commit=False) as session, session.begin():
        yield session


@contextmanager
def read_tx(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def locked(session: Session, query):
    """Row locks where the database has them (PostgreSQL); SQLite's BEGIN IMMEDIATE already
    serialises writers."""
    if session.get_bind().dialect.name == "postgresql":
        return query.with_for_update()
    return query


def add_event(session: Session, kind: EventKind, *, job_id: int | None = None, shard_id: int | None = None,
              worker_id: str | None = None, message: str = "", data: dict | None = None) -> None:
    session.add(Event(kind=kind, job_id=job_id, shard_id=shard_id, worker_id=worker_id,
                      message=message, data=data, created_at=utcnow()))


def get_job_locked(session: Session, job_id: int) -> Job:
    job = session.scalars(locked(session, select(Job).where(Job.id == job_id))).first()
    if job is None:
        raise UserError(f"no job {job_id}", "list jobs with `flexjob jobs`")
    return job
