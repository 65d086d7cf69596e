"""`flexjob report JOB -o report.png`: a job's run over time, from its events.

Top: generated tokens/s of every committed block (tokens / the block's seconds), one colour per
worker, with policy switches (`replan` events) as dashed blue lines and crashes (lease takeovers,
engine errors, shards released with an error, job failure) as red lines; graceful stops (signal,
cancel) as grey dotted lines. Bottom: the engine's peak RSS and peak GPU memory per block.

Reading (`read_report_data`), shaping (`report_data_from_events`, pure) and drawing (`write_report`,
matplotlib's Agg canvas without pyplot, so no display and no global figure state) are separate;
tests assert the extracted series.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from jobrunner.store.events import TAKEOVER_KINDS, EventKind
from jobrunner.store.models import Event, Job
from jobrunner.store.queries import read_job_events

GIB = 1 << 30
CRASH_KINDS = (*TAKEOVER_KINDS, EventKind.ENGINE_ERROR, EventKind.JOB_FAILED)


@dataclass(frozen=True, kw_only=True)
class BlockPoint:
    t_s: float               # commit time, seconds since the job started
    tokens: int
    seconds: float
    rows: int
    worker_id: str | None
    attempt: int | None
    peak_rss_bytes: int | None
    peak_gpu_bytes: int | None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True, kw_only=True)
class Marker:
    t_s: float
    kind: EventKind
    label: str


@dataclass(frozen=True, kw_only=True)
class ReportData:
    job_id: int
    job_name: str
    model: str
    status: str
    total_rows: int
    done_rows: int
    generated_tokens: int
    blocks: tuple[BlockPoint, ...]         # blocks that generated tokens, in commit order
    policy_switches: tuple[Marker, ...]
    crashes: tuple[Marker, ...]
    stops: tuple[Marker, ...]


def read_report_data(engine: Engine, job_id: int) -> ReportData:
    return report_data_from_events(*read_job_events(engine, job_id))


def report_data_from_events(job: Job, events: list[Event]) -> ReportData:
    origin = job.started_at or (events[0].created_at if events else job.created_at)

    def t(moment: datetime) -> float:
        return (moment - origin).total_seconds()

    blocks, switches, crashes, stops = [], [], [], []
    for e in events:
        data = e.data or {}
        if e.kind == EventKind.BLOCK_COMMITTED and data.get("tokens", 0) > 0 and data.get("seconds", 0) > 0:
            blocks.append(BlockPoint(t_s=t(e.created_at), tokens=data["tokens"], seconds=data["seconds"],
                                     rows=data.get("rows", 0), worker_id=e.worker_id, attempt=data.get("attempt"),
                                     peak_rss_bytes=data.get("peak_rss_bytes"),
                                     peak_gpu_bytes=data.get("peak_gpu_bytes")))
        elif e.kind == EventKind.REPLAN and data.get("applied", True):
            switches.append(Marker(t_s=t(e.created_at), kind=e.kind,
                                   label=data.get("new_describe") or e.message.partition(" -> ")[2] or "re-plan"))
        elif e.kind in CRASH_KINDS or (e.kind == EventKind.SHARD_RELEASED and data.get("error")):
            crashes.append(Marker(t_s=t(e.created_at), kind=e.kind, label=_crash_label(e.kind, e.message, data)))
        elif e.kind in (EventKind.SHARD_RELEASED, EventKind.JOB_CANCEL):
            stops.append(Marker(t_s=t(e.created_at), kind=e.kind, label=e.message or e.kind))
    return ReportData(job_id=job.id, job_name=job.name, model=Path(job.model_dir).name, status=job.status.value,
                      total_rows=job.total_rows, done_rows=job.done_rows, generated_tokens=job.generated_tokens,
                      blocks=tuple(blocks), policy_switches=tuple(switches), crashes=tuple(crashes), stops=tuple(stops))


def _crash_label(kind: EventKind, message: str, data: dict) -> str:
    if kind == EventKind.LEASE_EXPIRED:
        return "lease takeover"
    if kind == EventKind.WORKER_DEAD:
        return "dead worker's shard taken over"
    if kind == EventKind.ENGINE_ERROR:
        return "engine error"
    if kind == EventKind.JOB_FAILED:
        return "job failed"
    return f"crash: {data.get('error') or message}"[:40]


def _time_unit(span_s: float) -> tuple[str, float]:
    if span_s > 3 * 3600:
        return "hours", 3600.0
    if span_s > 180:
        return "minutes", 60.0
    return "seconds", 1.0


def write_report(data: ReportData, path: Path) -> Path:
    """Draw the two panels into a PNG at `path` (parent directories are created)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    times = [b.t_s for b in data.blocks] + [m.t_s for m in data.policy_switches + data.crashes + data.stops]
    unit, scale = _time_unit(max(times, default=0.0))
    fig = Figure(figsize=(11, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    speed, memory = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    fig.suptitle(f"job {data.job_id} · {data.job_name} · {data.model} · {data.status} · "
                 f"{data.done_rows}/{data.total_rows} rows · {data.generated_tokens} tokens")
    _speed_panel(speed, data, scale)
    _memory_panel(memory, data, scale)
    memory.set_xlim(0, max(times, default=1.0) / scale * 1.05 or 1.0)  # markers after the last block too
    memory.set_xlabel(f"{unit} since the job started")
    _markers(speed, memory, data, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _speed_panel(speed, data: ReportData, scale: float) -> None:
    """tokens/s of every block, one line per worker (named by its id)."""
    for i, worker in enumerate(dict.fromkeys(b.worker_id for b in data.blocks)):
        mine = [b for b in data.blocks if b.worker_id == worker]
        speed.plot([b.t_s / scale for b in mine], [b.tokens_per_s for b in mine], marker="o", markersize=3,
                   linewidth=1, color=f"C{i % 10}", label=f"worker {worker}")
    if not data.blocks:
        speed.text(0.5, 0.5, "no blocks committed yet", transform=speed.transAxes, ha="center", color="grey")
    speed.set_ylabel("tokens/s per block")
    speed.set_ylim(0, max((b.tokens_per_s for b in data.blocks), default=1.0) * 1.2)
    speed.grid(alpha=0.3)


def _memory_panel(memory, data: ReportData, scale: float) -> None:
    rss = [(b.t_s / scale, b.peak_rss_bytes / GIB) for b in data.blocks if b.peak_rss_bytes]
    gpu = [(b.t_s / scale, b.peak_gpu_bytes / GIB) for b in data.blocks if b.peak_gpu_bytes]
    if rss:
        memory.plot(*zip(*rss), drawstyle="steps-post", marker=".", color="C0", label="peak RSS (CPU)")
    if gpu:
        memory.plot(*zip(*gpu), drawstyle="steps-post", marker=".", color="C3", label="peak GPU memory")
    memory.set_ylabel("GiB")
    memory.set_ylim(0, max([v for _, v in rss + gpu], default=1.0) * 1.2)
    memory.grid(alpha=0.3)
    if rss or gpu:
        memory.legend(loc="lower right", fontsize=8)


def _markers(speed, memory, data: ReportData, scale: float) -> None:
    """Policy switches, crashes and stops as vertical lines on both panels, labelled on the top one."""
    for axis in (speed, memory):
        for marker in data.policy_switches:
            axis.axvline(marker.t_s / scale, color="tab:blue", linestyle="--", linewidth=1)
        for marker in data.crashes:
            axis.axvline(marker.t_s / scale, color="tab:red", linewidth=1.2)
        for marker in data.stops:
            axis.axvline(marker.t_s / scale, color="grey", linestyle=":", linewidth=1)
    for marker in data.policy_switches:
        speed.annotate(f"re-plan: {marker.label}", (marker.t_s / scale, 1.0), xycoords=("data", "axes fraction"),
                       rotation=90, va="top", ha="right", fontsize=7, color="tab:blue")
    for marker in data.crashes:
        speed.annotate(marker.label, (marker.t_s / scale, 1.0), xycoords=("data", "axes fraction"),
                       rotation=90, va="top", ha="right", fontsize=7, color="tab:red")
    _legend(speed, extra=[("tab:blue", "--", "policy switch"), ("tab:red", "-", "crash / takeover"),
                          ("grey", ":", "stop / cancel")] if data.blocks else [])


def _legend(axis, *, extra: list[tuple[str, str, str]]) -> None:
    from matplotlib.lines import Line2D

    handles, labels = axis.get_legend_handles_labels()
    for color, style, label in extra:
        handles.append(Line2D([], [], color=color, linestyle=style))
        labels.append(label)
    if handles:
        axis.legend(handles, labels, loc="best", fontsize=8)
