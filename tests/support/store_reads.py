"""Reading the job store's log and workers in tests (the product reads them through
jobrunner.store.queries, shaped for `status` and `report`)."""
from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from jobrunner.store.events import EventKind
from jobrunner.store.models import Event, Worker, WorkerStatus


def events(db: Engine, *, job_id: int | None = None, kinds: list[EventKind] | None = None) -> list[Event]:
    """Events, newest first."""
    query = select(Event).order_by(Event.id.desc())
    if job_id is not None:
        query = query.where(Event.job_id == job_id)
    if kinds:
        query = query.where(Event.kind.in_(kinds))
    with Session(db, expire_on_commit=False) as s:
        return list(s.scalars(query))


def workers(db: Engine, *, running_only: bool = False) -> list[Worker]:
    query = select(Worker).order_by(Worker.last_seen_at.desc())
    if running_only:
        query = query.where(Worker.status == WorkerStatus.RUNNING)
    with Session(db, expire_on_commit=False) as s:
        return list(s.scalars(query))
