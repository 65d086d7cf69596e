"""What `flexjob status` shows: the store's status data (jobrunner.store.queries) as one plain dict
(the `--json` schema).

Everything shown is derived from what workers already record: the jobs, shards, workers and
result_parts tables and the events log (`block_committed` carries each block's tokens, seconds,
memory peaks and per-link transfers; `replan` carries the profiled and measured bandwidth). The
profiled bandwidth of a worker that has not re-planned comes from the hardware profile it plans
with (engine.planning's JSON store, `Worker.profile_path`), read fresh, as the planner reads it.

Every time is an ISO-8601 UTC string ending in "Z"; every duration is in seconds; every rate is
per wall-clock second; bandwidth is GB/s (1e9 bytes); memory is bytes. docs/STATUS.md documents
each field.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from engine.planning.hardware import LINK_FIELDS, HardwareProfile
from jobrunner.store.db_url import mask_url
from jobrunner.store.events import EventKind
from jobrunner.store.models import Event, Job, JobStatus, ShardStatus, Worker, WorkerStatus, utcnow
from jobrunner.store.queries import CurrentWork, StatusData, StatusQuery, WorkerView, read_status
from jobrunner.worker.liveness import worker_state

SCHEMA = "flexjob.status/1"
# Events worth a line on the dashboard (block commits and claims are routine: they show as progress).
NOTABLE_EVENTS = tuple(k for k in EventKind if k not in (EventKind.BLOCK_COMMITTED, EventKind.SHARD_CLAIMED))


@dataclass(frozen=True, kw_only=True)
class SnapshotOptions:
    job_id: int | None = None        # focus on one job: its row, its workers, its events
    job_limit: int = 20              # unfinished jobs always show; finished ones fill up to this
    event_limit: int = 12
    recent_window_s: float = 60.0    # "recent" tokens/s and the ETA use the blocks committed in this window
    stale_after_s: float = 60.0      # a running worker not seen for this long is flagged stale
    worker_blocks: int = 10          # a worker's latest blocks: measured bandwidth and memory peaks
    stopped_worker_s: float = 600.0  # stopped and dead workers stay listed this long
    forget_worker_s: float = 86400.0  # a worker not seen for this long (killed, never stopped) is left out


def read_snapshot(engine: Engine, options: SnapshotOptions = SnapshotOptions(), *,
                  now: datetime | None = None) -> dict:
    """The whole dashboard's data as plain JSON-able values (see docs/STATUS.md)."""
    now = now or utcnow()
    data = read_status(engine, StatusQuery(
        now=now, job_id=options.job_id, job_limit=options.job_limit, event_limit=options.event_limit,
        event_kinds=NOTABLE_EVENTS, recent_since=now - timedelta(seconds=options.recent_window_s),
        worker_blocks=options.worker_blocks, seen_since=now - timedelta(seconds=options.forget_worker_s),
        stopped_since=now - timedelta(seconds=options.stopped_worker_s)))
    workers = _worker_rows(data, options, now)
    return {"schema": SCHEMA, "generated_at": _iso(now), "database": mask_url(str(engine.url)),
            "focus_job_id": options.job_id, "recent_window_s": options.recent_window_s,
            "stale_after_s": options.stale_after_s, "jobs": _job_rows(data, options, now, workers),
            "workers": workers, "events": [_event_row(e, now) for e in data.events]}


# -- jobs ---------------------------------------------------------------------------------------
def _job_rows(data: StatusData, options: SnapshotOptions, now: datetime, workers: list[dict]) -> list[dict]:
    rows = []
    for job in data.jobs:
        shards = {status.value: count for status, count in data.shard_counts[job.id].items()}
        blocks = [e for e in data.recent_blocks if e.job_id == job.id]
        rows.append(_job_row(job, shards, data.expired_leases.get(job.id, 0), blocks, options, now,
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
def _worker_rows(data: StatusData, options: SnapshotOptions, now: datetime) -> list[dict]:
    rows = []
    for view in data.workers:
        current = _current_work(view.current)
        if options.job_id is not None and (current or {}).get("job_id") != options.job_id \
                and not any(e.worker_id == view.worker.id and e.job_id == options.job_id for e in data.recent_blocks):
            continue
        rows.append(_worker_row(view, current, options, now))
    return rows


def _current_work(work: CurrentWork | None) -> dict | None:
    if work is None:
        return None
    shard = work.shard
    return {"job_id": shard.job_id, "job_name": work.job_name, "shard_id": shard.id,
            "shard_index": shard.shard_index, "attempt": shard.attempt, "block": work.blocks_done + 1,
            "shard_done_rows": shard.done_rows, "shard_rows": shard.row_end - shard.row_start,
            "lease_expires_at": _iso(shard.lease_expires_at)}


def _worker_row(view: WorkerView, current: dict | None, options: SnapshotOptions, now: datetime) -> dict:
    worker, blocks = view.worker, view.blocks
    heartbeat_age = (now - worker.last_seen_at).total_seconds()
    state = worker_state(worker, heartbeat_age_s=heartbeat_age, stale_after_s=options.stale_after_s)
    running = worker.status == WorkerStatus.RUNNING
    busy_s = sum(_data(e).get("seconds", 0.0) for e in blocks)
    return {
        "id": worker.id, "hostname": worker.hostname, "pid": worker.pid, "device": worker.device,
        "status": worker.status.value, "state": state.value,
        "started_at": _iso(worker.started_at), "last_seen_at": _iso(worker.last_seen_at),
        "heartbeat_age_s": heartbeat_age, "stale": state.value == "stale",
        "current": current, "policy": policy_summary(worker.policy),
        # The shard it last claimed, now another worker's (taken over from it).
        "lost": None if view.lost is None else {"job_id": view.lost.job_id, "shard_index": view.lost.shard_index,
                                                "attempt": view.lost.attempt, "holder": view.lost.worker_id},
        "rows_done": worker.rows_done, "tokens_generated": worker.tokens_generated,
        # Generation speed over its latest blocks (tokens per second of block time, idle time excluded).
        "tokens_per_s_recent": sum(_data(e).get("tokens", 0) for e in blocks) / busy_s if running and busy_s else None,
        "bandwidth": _bandwidth(view),
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


def _bandwidth(view: WorkerView) -> dict[str, dict]:
    """{link: {measured_gbps, profiled_gbps, bytes, seconds}}: measured over the worker's latest blocks,
    profiled from its latest re-plan event, else from the hardware profile it plans with."""
    moved: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in view.blocks:
        for link, (nbytes, seconds) in (_data(event).get("transfers") or {}).items():
            moved[link][0] += nbytes
            moved[link][1] += seconds
    profiled = _profiled_gbps(view)
    links = [link for link in LINK_FIELDS if moved.get(link, [0, 0])[0] > 0 or profiled.get(link)]
    return {link: {"measured_gbps": moved[link][0] / moved[link][1] / 1e9 if moved.get(link, [0, 0])[1] > 0 else None,
                   "profiled_gbps": profiled.get(link), "bytes": int(moved.get(link, [0, 0])[0]),
                   "seconds": moved.get(link, [0, 0])[1]}
            for link in links}


def _profiled_gbps(view: WorkerView) -> dict[str, float]:
    if view.last_replan is not None and _data(view.last_replan).get("profiled_gbps"):
        return dict(_data(view.last_replan)["profiled_gbps"])
    path = view.worker.profile_path
    if not path or not Path(path).is_file():  # no profile, or one on another machine
        return {}
    try:
        profile = HardwareProfile.load(Path(path))
    except (ValueError, OSError):
        return {}
    return {link: profile.link_gbps(link) for link in LINK_FIELDS if profile.link_gbps(link)}


# -- events -------------------------------------------------------------------------------------
def _event_row(e: Event, now: datetime) -> dict:
    return {"id": e.id, "at": _iso(e.created_at), "age_s": (now - e.created_at).total_seconds(), "kind": e.kind.value,
            "job_id": e.job_id, "shard_id": e.shard_id, "worker_id": e.worker_id, "message": e.message,
            "summary": describe_event(e.kind, e.message, _data(e)), "data": e.data}


def describe_event(kind: EventKind, message: str, data: dict) -> str:
    """One line a person reads: what happened and why."""
    if kind == EventKind.REPLAN:
        old = data.get("old_describe") or _describe_policy(data.get("old_policy"))
        new = data.get("new_describe") or _describe_policy(data.get("new_policy"))
        why = ", ".join(f"{link} {data['measured_gbps'][link]:.2f} GB/s measured vs "
                        f"{(data.get('profiled_gbps') or {}).get(link, 0):.2f} profiled"
                        for link in data.get("drifted_links", []) if link in (data.get("measured_gbps") or {}))
        gain = data.get("predicted_gain")
        gain_text = f", predicted {gain:+.0%}" if isinstance(gain, (int, float)) and gain != float("inf") else ""
        return f"re-planned {old} -> {new}" + (f" ({why}{gain_text})" if why or gain_text else "")
    if kind == EventKind.LEASE_EXPIRED:
        return f"lease takeover: {message}" if message else "lease takeover"
    if kind == EventKind.WORKER_DEAD:
        return f"dead worker: {message}" if message else "dead worker"
    if kind == EventKind.SHARD_RELEASED:
        error = data.get("error")
        return f"shard released ({message})" + (f": {error}" if error else "")
    if kind == EventKind.ENGINE_ERROR:
        return f"engine error (try {data.get('try', '?')}, {len(data.get('rows', []))} rows): {message}"
    if kind == EventKind.SHARD_RESUMED:
        return (f"resumed {data.get('rows', 0)} rows with {data.get('tokens', 0)} saved tokens "
                f"(attempt {data.get('attempt')})")
    if kind == EventKind.JOB_ENQUEUED:
        return f"enqueued {data.get('rows', '?')} rows" + (" (forced)" if data.get("forced") else "")
    if kind == EventKind.JOB_COMPLETED:
        return f"completed: {data.get('rows', '?')} rows, {data.get('failed', 0)} error rows"
    if kind == EventKind.PARTS_DROPPED:
        return f"{data.get('rows', 0)} rows reopened: {message}"
    if kind == EventKind.WORKER_STARTED:
        return f"worker started on {data.get('device', '?')}"
    text = kind.value.replace("_", " ")
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
