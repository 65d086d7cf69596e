"""What `flexjob status` shows, read from the job store into one plain dict (the `--json` schema).

Reading only: one read transaction per snapshot (SQLite WAL readers never block a worker's commit;
PostgreSQL gets a read-only REPEATABLE READ snapshot), no migration, no lock. Everything shown is
derived from what workers already record: the jobs, shards, workers and result_parts tables and the
events log (`block_committed` carries each block's tokens, seconds, memory peaks and per-link
transfers; `replan` carries the profiled and measured bandwidth).

Every time is an ISO-8601 UTC string ending in "Z"; every duration is in seconds; every rate is
per wall-clock second; bandwidth is GB/s (1e9 bytes); memory is bytes. docs/STATUS.md documents
each field.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from engine.planning.hardware import LINK_FIELDS
from jobrunner.store.db import head_revision, open_store, resolve_url, schema_revision
from jobrunner.store.db_url import mask_url
from jobrunner.errors import UserError
from jobrunner.store.models import Event, HardwareProfile, Job, JobStatus, ResultPart, Shard, ShardStatus, Worker, \
    WorkerStatus, utcnow

SCHEMA = "flexjob.status/1"
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING)
# Events worth a line on the dashboard (block commits and claims are routine: they show as progress).
NOTABLE_EVENTS = ("job_enqueued", "job_started", "replan", "job_retry", "lease_expired", "engine_error",
                  "shard_released", "shard_resumed", "parts_dropped", "job_failed", "job_cancel", "job_cancelled",
                  "job_completed", "worker_started", "worker_stopped")


@dataclass(frozen=True, kw_only=True)
class SnapshotOptions:
    job_id: int | None = None        # focus on one job: its row, its workers, its events
    job_limit: int = 20              # unfinished jobs always show; finished ones fill up to this
    event_limit: int = 12
    recent_window_s: float = 60.0    # "recent" tokens/s and the ETA use the blocks committed in this window
    stale_after_s: float = 60.0      # a running worker not seen for this long is flagged stale
    worker_blocks: int = 10          # a worker's latest blocks: measured bandwidth and memory peaks
    stopped_worker_s: float = 600.0  # stopped workers stay listed this long
    forget_worker_s: float = 86400.0  # a worker not seen for this long (killed, never stopped) is left out


def open_store_for_reading(db: str | None) -> Engine:
    """An Engine on an existing store at the current schema; never creates or migrates anything."""
    url_text = resolve_url(db)
    url = make_url(url_text)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).expanduser().is_file():
        raise UserError(f"no job store at {mask_url(url_text)}",
                        "enqueue a job first, or point --db / FLEXJOB_DB at the store the workers use")
    engine = open_store(url_text, migrate=False)
    current = schema_revision(engine)
    if current is None:
        raise UserError(f"{mask_url(url_text)} is not a flexjob job store (no schema)",
                        "point --db / FLEXJOB_DB at the store the workers use")
    if current != head_revision():
        raise UserError(f"job store {mask_url(url_text)} has schema {current}; this flexjob expects {head_revision()}",
                        "use the flexjob version the workers run (`flexjob jobs` upgrades an older store)")
    return engine


def read_snapshot(engine: Engine, options: SnapshotOptions = SnapshotOptions(), *,
                  now: datetime | None = None) -> dict:
    """The whole dashboard's data as plain JSON-able values (see docs/STATUS.md)."""
    now = now or utcnow()
    reader = engine
    if engine.dialect.name == "postgresql":
        reader = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    with Session(reader) as s, s.begin():
        jobs = _select_jobs(s, options)
        if options.job_id is not None and not jobs:
            raise UserError(f"no job {options.job_id}", "list jobs with `flexjob jobs`")
        recent = _recent_blocks(s, now - timedelta(seconds=options.recent_window_s), options.job_id)
        workers = _worker_rows(s, options, now, recent)
        job_rows = _job_rows(s, jobs, options, now, recent, workers)
        events = _event_rows(s, options, now)
    return {"schema": SCHEMA, "generated_at": _iso(now), "database": mask_url(str(engine.url)),
            "focus_job_id": options.job_id, "recent_window_s": options.recent_window_s,
            "stale_after_s": options.stale_after_s, "jobs": job_rows, "workers": workers, "events": events}


# -- jobs ---------------------------------------------------------------------------------------
def _select_jobs(s: Session, options: SnapshotOptions) -> list[Job]:
    if options.job_id is not None:
        job = s.get(Job, options.job_id)
        return [job] if job is not None else []
    unfinished = list(s.scalars(select(Job).where(Job.status.in_(UNFINISHED))))
    room = max(options.job_limit - len(unfinished), 0)
    finished = list(s.scalars(select(Job).where(Job.status.not_in(UNFINISHED)).order_by(Job.id.desc())
                              .limit(room))) if room else []
    return sorted(unfinished + finished, key=lambda j: j.id, reverse=True)


def _job_rows(s: Session, jobs: list[Job], options: SnapshotOptions, now: datetime, recent: list[Event],
              workers: list[dict]) -> list[dict]:
    ids = [j.id for j in jobs]
    shard_counts: dict[int, dict[str, int]] = defaultdict(lambda: {st.value: 0 for st in ShardStatus})
    for job_id, status, count in s.execute(select(Shard.job_id, Shard.status, func.count())
                                           .where(Shard.job_id.in_(ids)).group_by(Shard.job_id, Shard.status)):
        shard_counts[job_id][status.value] = count
    expired = dict(s.execute(select(Shard.job_id, func.count())
                             .where(Shard.job_id.in_(ids), Shard.status == ShardStatus.LEASED,
                                    Shard.lease_expires_at < now).group_by(Shard.job_id)).all())
    rows = []
    for job in jobs:
        blocks = [e for e in recent if e.job_id == job.id]
        rows.append(_job_row(job, dict(shard_counts[job.id]), expired.get(job.id, 0), blocks, options, now,
                             [w["id"] for w in workers if (w["current"] or {}).get("job_id") == job.id]))
    return rows


def _job_row(job: Job, shards: dict[str, int], expired_leases: int, blocks: list[Event], options: SnapshotOptions,
             now: datetime, worker_ids: list[str]) -> dict:
    finished = job.status.finished
    elapsed = ((job.finished_at or now) - job.started_at).total_seconds() if job.started_at else 0.0
    avg_tps = job.generated_tokens / elapsed if elapsed > 0 else None
    recent_tps = eta = None
    if not finished and job.started_at is not None:
        window_start = max(now - timedelta(seconds=options.recent_window_s), job.started_at)
        span = (now - window_start).total_seconds()
        if span > 0:
            recent_tps = sum(_data(e).get("tokens", 0) for e in blocks) / span
            rows_per_s = sum(_data(e).get("rows", 0) for e in blocks) / span
            if rows_per_s <= 0 and elapsed > 0:
                rows_per_s = job.done_rows / elapsed
            remaining = job.total_rows - job.done_rows
            if job.status == JobStatus.RUNNING and rows_per_s > 0:
                eta = remaining / rows_per_s
    live_leases = shards[ShardStatus.LEASED.value] - expired_leases
    return {
        "id": job.id, "name": job.name, "model": Path(job.model_dir).name, "model_dir": job.model_dir,
        "status": job.status.value, "priority": job.priority,
        "total_rows": job.total_rows, "done_rows": job.done_rows, "failed_rows": job.failed_rows,
        "progress": job.done_rows / job.total_rows if job.total_rows else 1.0,
        "generated_tokens": job.generated_tokens,
        "tokens_per_s_recent": recent_tps, "tokens_per_s_average": avg_tps, "eta_s": eta,
        "age_s": (now - job.created_at).total_seconds(),
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
        "error": job.error, "shards": shards, "expired_leases": expired_leases,
        # Running, yet every lease it holds has expired: its workers died or lost the database.
        "stale": job.status in (JobStatus.RUNNING, JobStatus.CANCELLING) and expired_leases > 0 and live_leases == 0,
        "workers": worker_ids,
        "params": {k: job.params.get(k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "dtype")},
    }


# -- workers ------------------------------------------------------------------------------------
def _worker_rows(s: Session, options: SnapshotOptions, now: datetime, recent: list[Event]) -> list[dict]:
    seen_since = now - timedelta(seconds=options.forget_worker_s)
    stopped_since = now - timedelta(seconds=options.stopped_worker_s)
    query = (select(Worker).where(((Worker.status == WorkerStatus.RUNNING) & (Worker.last_seen_at >= seen_since))
                                  | ((Worker.status == WorkerStatus.STOPPED) & (Worker.stopped_at >= stopped_since)))
             .order_by(Worker.started_at.desc()))
    rows = []
    for worker in s.scalars(query):
        current = _current_work(s, worker)
        if options.job_id is not None and (current or {}).get("job_id") != options.job_id \
                and not any(e.worker_id == worker.id and e.job_id == options.job_id for e in recent):
            continue
        rows.append(_worker_row(s, worker, current, options, now))
    return rows


def _current_work(s: Session, worker: Worker) -> dict | None:
    if worker.current_shard_id is None or worker.status != WorkerStatus.RUNNING:
        return None
    shard = s.get(Shard, worker.current_shard_id)
    if shard is None or shard.worker_id != worker.id:
        return None
    job = s.get(Job, shard.job_id)
    blocks_done = s.scalar(select(func.count()).select_from(ResultPart)
                           .where(ResultPart.shard_id == shard.id, ResultPart.attempt == shard.attempt))
    return {"job_id": shard.job_id, "job_name": job.name if job else None, "shard_id": shard.id,
            "shard_index": shard.shard_index, "attempt": shard.attempt, "block": blocks_done + 1,
            "shard_done_rows": shard.done_rows, "shard_rows": shard.row_end - shard.row_start,
            "lease_expires_at": _iso(shard.lease_expires_at)}


def _worker_row(s: Session, worker: Worker, current: dict | None, options: SnapshotOptions, now: datetime) -> dict:
    blocks = list(s.scalars(select(Event).where(Event.kind == "block_committed", Event.worker_id == worker.id)
                            .order_by(Event.id.desc()).limit(options.worker_blocks)))
    heartbeat_age = (now - worker.last_seen_at).total_seconds()
    running = worker.status == WorkerStatus.RUNNING
    busy_s = sum(_data(e).get("seconds", 0.0) for e in blocks)
    return {
        "id": worker.id, "hostname": worker.hostname, "pid": worker.pid, "device": worker.device,
        "status": worker.status.value, "started_at": _iso(worker.started_at), "last_seen_at": _iso(worker.last_seen_at),
        "heartbeat_age_s": heartbeat_age, "stale": running and heartbeat_age > options.stale_after_s,
        "current": current, "policy": policy_summary(worker.policy),
        "rows_done": worker.rows_done, "tokens_generated": worker.tokens_generated,
        # Generation speed over its latest blocks (tokens per second of block time, idle time excluded).
        "tokens_per_s_recent": sum(_data(e).get("tokens", 0) for e in blocks) / busy_s if running and busy_s else None,
        "bandwidth": _bandwidth(s, worker, blocks),
        "peak_rss_bytes": max((_data(e).get("peak_rss_bytes") or 0 for e in blocks), default=None),
        "peak_gpu_bytes": max((_data(e).get("peak_gpu_bytes") or 0 for e in blocks), default=None),
    }


def policy_summary(policy: dict | None) -> dict | None:
    """The parts of a stored Policy the dashboard shows (None: the worker has not chosen one yet)."""
    if not policy:
        return None
    names = ("weights_gpu_percent", "weights_cpu_percent", "cache_gpu_percent", "cache_cpu_percent",
             "activations_gpu_percent", "activations_cpu_percent")
    compression = policy.get("compression") or {}
    gbs, ngb = policy.get("gpu_batch_size", 1), policy.get("num_gpu_batches", 1)
    return {"gpu_batch_size": gbs, "num_gpu_batches": ngb, "block_size": gbs * ngb,
            "percents": [policy.get(n, 0.0) for n in names],
            "compress_weight": bool(policy.get("compress_weight")),
            "compress_cache": bool(policy.get("compress_cache")),
            "compression_bits": compression.get("num_bits"), "compression_group_size": compression.get("group_size"),
            "overlap": bool(policy.get("overlap")), "cpu_cache_compute": bool(policy.get("cpu_cache_compute"))}


def _bandwidth(s: Session, worker: Worker, blocks: list[Event]) -> dict[str, dict]:
    """{link: {measured_gbps, profiled_gbps, bytes, seconds}}: measured over the worker's latest blocks,
    profiled from its latest re-plan event, else the host's stored profile."""
    moved: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in blocks:
        for link, (nbytes, seconds) in (_data(event).get("transfers") or {}).items():
            moved[link][0] += nbytes
            moved[link][1] += seconds
    profiled = _profiled_gbps(s, worker)
    links = [link for link in LINK_FIELDS if moved.get(link, [0, 0])[0] > 0 or profiled.get(link)]
    return {link: {"measured_gbps": moved[link][0] / moved[link][1] / 1e9 if moved.get(link, [0, 0])[1] > 0 else None,
                   "profiled_gbps": profiled.get(link), "bytes": int(moved.get(link, [0, 0])[0]),
                   "seconds": moved.get(link, [0, 0])[1]}
            for link in links}


def _profiled_gbps(s: Session, worker: Worker) -> dict[str, float]:
    replan = s.scalars(select(Event).where(Event.kind == "replan", Event.worker_id == worker.id)
                       .order_by(Event.id.desc()).limit(1)).first()
    if replan is not None and _data(replan).get("profiled_gbps"):
        return dict(_data(replan)["profiled_gbps"])
    profile = s.scalars(select(HardwareProfile).where(HardwareProfile.hostname == worker.hostname)
                        .order_by(HardwareProfile.id.desc()).limit(1)).first()
    if profile is None:
        return {}
    return {link: profile.data[field] for link, field in LINK_FIELDS.items() if profile.data.get(field)}


# -- events -------------------------------------------------------------------------------------
def _recent_blocks(s: Session, since: datetime, job_id: int | None) -> list[Event]:
    query = select(Event).where(Event.kind == "block_committed", Event.created_at >= since)
    if job_id is not None:
        query = query.where(Event.job_id == job_id)
    return list(s.scalars(query))


def _event_rows(s: Session, options: SnapshotOptions, now: datetime) -> list[dict]:
    query = select(Event).where(Event.kind.in_(NOTABLE_EVENTS)).order_by(Event.id.desc()).limit(options.event_limit)
    if options.job_id is not None:
        query = query.where(Event.job_id == options.job_id)
    return [{"id": e.id, "at": _iso(e.created_at), "age_s": (now - e.created_at).total_seconds(), "kind": e.kind,
             "job_id": e.job_id, "shard_id": e.shard_id, "worker_id": e.worker_id, "message": e.message,
             "summary": describe_event(e.kind, e.message, _data(e)), "data": e.data}
            for e in s.scalars(query)]


def describe_event(kind: str, message: str, data: dict) -> str:
    """One line a person reads: what happened and why."""
    if kind == "replan":
        old = data.get("old_describe") or _describe_policy(data.get("old_policy"))
        new = data.get("new_describe") or _describe_policy(data.get("new_policy"))
        why = ", ".join(f"{link} {data['measured_gbps'][link]:.2f} GB/s measured vs "
                        f"{(data.get('profiled_gbps') or {}).get(link, 0):.2f} profiled"
                        for link in data.get("drifted_links", []) if link in (data.get("measured_gbps") or {}))
        gain = data.get("predicted_gain")
        gain_text = f", predicted {gain:+.0%}" if isinstance(gain, (int, float)) and gain != float("inf") else ""
        return f"re-planned {old} -> {new}" + (f" ({why}{gain_text})" if why or gain_text else "")
    if kind == "lease_expired":
        return f"lease takeover: {message}" if message else "lease takeover"
    if kind == "shard_released":
        error = data.get("error")
        return f"shard released ({message})" + (f": {error}" if error else "")
    if kind == "engine_error":
        return f"engine error (try {data.get('try', '?')}, {len(data.get('rows', []))} rows): {message}"
    if kind == "shard_resumed":
        return (f"resumed {data.get('rows', 0)} rows with {data.get('tokens', 0)} saved tokens "
                f"(attempt {data.get('attempt')})")
    if kind == "job_enqueued":
        return f"enqueued {data.get('rows', '?')} rows" + (" (forced)" if data.get("forced") else "")
    if kind == "job_completed":
        return f"completed: {data.get('rows', '?')} rows, {data.get('failed', 0)} error rows"
    if kind == "parts_dropped":
        return f"{data.get('rows', 0)} rows reopened: {message}"
    if kind == "worker_started":
        return f"worker started on {data.get('device', '?')}"
    text = kind.replace("_", " ")
    return f"{text}: {message}" if message else text


def _describe_policy(policy: dict | None) -> str:
    p = policy_summary(policy)
    if p is None:
        return "?"
    return f"{p['gpu_batch_size']}x{p['num_gpu_batches']} [{' '.join(f'{v:g}' for v in p['percents'])}]"


def _data(event: Event) -> dict:
    return event.data or {}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"
