"""The `flexjob status` dashboard: rich renderables built from a status snapshot (a plain dict).

Pure functions of the snapshot (`jobrunner.observe.snapshot.read_snapshot`): nothing here reads the
store or the clock, so a test renders any state into a recorded Console and reads the text back,
and `--watch` simply re-renders a fresh snapshot. docs/STATUS.md explains every column.
"""
from __future__ import annotations

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from jobrunner.store.events import EventKind

STATUS_STYLES = {"queued": "cyan", "running": "green", "cancelling": "yellow", "completed": "blue",
                 "failed": "bold red", "cancelled": "magenta"}
EVENT_STYLES = {kind.value: style for kind, style in (
    (EventKind.REPLAN, "bold cyan"), (EventKind.LEASE_EXPIRED, "bold yellow"), (EventKind.WORKER_DEAD, "bold yellow"),
    (EventKind.ENGINE_ERROR, "red"), (EventKind.JOB_FAILED, "bold red"), (EventKind.JOB_CANCEL, "magenta"),
    (EventKind.JOB_CANCELLED, "magenta"), (EventKind.JOB_RETRY, "yellow"), (EventKind.JOB_COMPLETED, "blue"),
    (EventKind.SHARD_RELEASED, "yellow"), (EventKind.SHARD_RESUMED, "cyan"))}
DRIFT_WARN = 0.30  # measured bandwidth this far from the profile is highlighted (the re-planning threshold)
PERCENT_LABELS = ("w", "c", "a")
NAME_WIDTH = 24
WIDE = 120  # columns the full layout needs  # weights, KV cache, activations: GPU/CPU percents (the rest on disk)


def render_dashboard(snapshot: dict, *, width: int | None = None) -> RenderableType:
    """The whole screen: header, jobs, (focused job's details), workers, recent events.
    `width`: the terminal's columns; under WIDE the jobs table is compact."""
    parts: list[RenderableType] = [header_line(snapshot)]
    compact = width is not None and width < WIDE
    parts.append(Panel(jobs_table(snapshot["jobs"], compact=compact), title="Jobs", title_align="left",
                       box=box.ROUNDED))
    if snapshot.get("focus_job_id") is not None and snapshot["jobs"]:
        parts.append(Panel(job_details(snapshot["jobs"][0]), title=f"Job {snapshot['focus_job_id']}",
                           title_align="left", box=box.ROUNDED))
    parts.append(Panel(workers_table(snapshot["workers"]), title="Workers", title_align="left", box=box.ROUNDED))
    parts.append(Panel(events_table(snapshot["events"]), title="Recent events", title_align="left", box=box.ROUNDED))
    return Group(*parts)


def header_line(snapshot: dict) -> Text:
    jobs, workers = snapshot["jobs"], snapshot["workers"]
    live, stale, dead = (sum(w["state"] == state for w in workers) for state in ("live", "stale", "dead"))
    text = Text.assemble(("flexjob status", "bold"), f"  {snapshot['database']}  ",
                         (f"{snapshot['generated_at']}", "dim"),
                         f"  · {plural(len(jobs), 'job')} · {plural(live, 'worker')} live")
    if stale:
        text.append(f" · {stale} stale", style="bold red")
    if dead:
        text.append(f" · {dead} dead", style="bold red")
    return text


# -- jobs ---------------------------------------------------------------------------------------
def jobs_table(jobs: list[dict], *, compact: bool = False) -> RenderableType:
    """One line per job; `compact` (under WIDE columns) drops the model and shortens the bar."""
    if not jobs:
        return Text("no jobs: enqueue one with `flexjob enqueue PROMPTS.parquet --model DIR`", style="dim")
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    columns = [("ID", "right"), ("Name", "left"), ("Model", "left"), ("Status", "left"), ("Progress", "left"),
               ("Failed", "right"), ("tok/s now", "right"), ("tok/s avg", "right"), ("ETA", "right"), ("Age", "right")]
    if compact:
        columns.remove(("Model", "left"))
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=name not in ("Model", "tok/s now", "tok/s avg"))
    # Names are what people look for: keep them whole up to NAME_WIDTH (then "…"), squeeze the rest first.
    table.columns[1].min_width = min(max(len(job["name"]) for job in jobs), NAME_WIDTH)
    for job in jobs:
        cells = [str(job["id"]), job["name"], job["model"], job_status_text(job), progress_cell(job, compact=compact),
                 Text(str(job["failed_rows"]), style="red" if job["failed_rows"] else ""),
                 format_rate(job["tokens_per_s_recent"]), format_rate(job["tokens_per_s_average"]),
                 format_duration(job["eta_s"]), format_duration(job["age_s"])]
        if compact:
            del cells[2]
        table.add_row(*cells)
    return table


def job_status_text(job: dict) -> Text:
    text = Text(job["status"], style=STATUS_STYLES.get(job["status"], ""))
    if job["stale"]:
        text.append(" STALE", style="bold red")
    return text


def progress_cell(job: dict, *, compact: bool = False) -> RenderableType:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    style = "red" if job["status"] == "failed" else "green" if job["status"] == "completed" else "cyan"
    bar = ProgressBar(total=max(job["total_rows"], 1), completed=job["done_rows"], width=8 if compact else 16,
                      complete_style=style, finished_style=style)
    grid.add_row(bar, f"{job['done_rows']}/{job['total_rows']} {job['progress']:.0%}")
    return grid


def job_details(job: dict) -> RenderableType:
    shards = job["shards"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("shards", " · ".join(f"{n} {status}" for status, n in shards.items() if n)
                 + (f" ({job['expired_leases']} with an expired lease)" if job["expired_leases"] else ""))
    grid.add_row("tokens", f"{job['generated_tokens']}")
    grid.add_row("model", job["model_dir"])
    grid.add_row("params", " ".join(f"{k}={v}" for k, v in job["params"].items() if v is not None))
    grid.add_row("times", f"created {job['created_at']} · started {job['started_at'] or '-'} · "
                          f"finished {job['finished_at'] or '-'}")
    grid.add_row("workers", ", ".join(job["workers"]) or "-")
    if job["error"]:
        grid.add_row("error", Text(job["error"], style="red"))
    return grid


# -- workers ------------------------------------------------------------------------------------
def workers_table(workers: list[dict]) -> RenderableType:
    """One row per worker, three lines at most, about 115 columns: fits a 120-column terminal."""
    if not workers:
        return Text("no workers running: start one with `flexjob work`", style="dim")
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    # The worker's id is its name in events and logs too: never cut, the other columns give way.
    table.add_column("Worker", no_wrap=True, min_width=max(len(w["id"]) for w in workers))
    for name, justify in (("Heartbeat", "right"), ("Working on", "left"), ("Policy", "left"),
                          ("GB/s measured/profiled", "left"), ("Peak memory", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for worker in workers:
        table.add_row(f"{worker['id']}\n{worker['device']}", heartbeat_text(worker),
                      current_work_text(worker), policy_text(worker["policy"]), bandwidth_text(worker["bandwidth"]),
                      f"RSS {format_bytes(worker['peak_rss_bytes'])}\nGPU {format_bytes(worker['peak_gpu_bytes'])}")
    return table


def heartbeat_text(worker: dict) -> Text:
    """live: time since the last heartbeat; STALE: none within --stale-after; DEAD: its process is gone."""
    age = format_duration(worker["heartbeat_age_s"])
    if worker["state"] == "dead":
        return Text(f"DEAD\n{age} ago", style="bold red")
    if worker["state"] == "stopped":
        return Text(f"stopped\n{age} ago", style="dim")
    if worker["state"] == "stale":
        return Text(f"{age} STALE", style="bold red")
    return Text(f"{age} ago", style="green")


def current_work_text(worker: dict) -> str:
    """job/shard/block in progress, the shard's attempt and rows, the worker's generation speed."""
    current = worker["current"]
    lost = worker["lost"]
    if current is None and lost is not None:
        return f"lost job {lost['job_id']} shard {lost['shard_index']}\ntaken over: attempt {lost['attempt']}"
    if current is None:
        return "idle" if worker["state"] in ("live", "stale") else "-"
    if worker["state"] == "dead":  # the next claim on any worker takes this shard over
        return (f"dead on job {current['job_id']} shard {current['shard_index']}\n"
                f"attempt {current['attempt']} · {current['shard_done_rows']}/{current['shard_rows']} rows")
    return (f"job {current['job_id']} shard {current['shard_index']} block {current['block']}\n"
            f"attempt {current['attempt']} · {current['shard_done_rows']}/{current['shard_rows']} rows\n"
            f"{format_rate(worker['tokens_per_s_recent'])} tok/s")


def policy_text(policy: dict | None) -> str:
    """e.g. "8×2 = 16 rows / w 50/50 c 100/0 a 100/0 / 4-bit g64: weights" (GPU/CPU %, rest on disk)."""
    if policy is None:
        return "-"
    pct = policy["percents"]
    places = " ".join(f"{label} {pct[2 * i]:g}/{pct[2 * i + 1]:g}" for i, label in enumerate(PERCENT_LABELS))
    compressed = [name for name, on in (("weights", policy["compress_weight"]), ("cache", policy["compress_cache"]))
                  if on]
    compression = (f"{policy['compression_bits']}-bit g{policy['compression_group_size']}: {'+'.join(compressed)}"
                   if compressed else "no compression")
    return (f"{policy['gpu_batch_size']}×{policy['num_gpu_batches']} = {plural(policy['block_size'], 'row')}\n"
            f"{places}\n{compression}")


def bandwidth_text(bandwidth: dict) -> Text:
    if not bandwidth:
        return Text("-", style="dim")
    text = Text()
    for i, (link, figures) in enumerate(bandwidth.items()):
        measured, profiled = figures["measured_gbps"], figures["profiled_gbps"]
        drifted = measured is not None and profiled and abs(measured / profiled - 1) > DRIFT_WARN
        text.append(("\n" if i else "") + f"{link} ")
        text.append(f"{measured:.2f}" if measured is not None else "-", style="bold yellow" if drifted else "")
        text.append(f"/{profiled:.2f}" if profiled else "/-")
    return text


# -- events -------------------------------------------------------------------------------------
def events_table(events: list[dict]) -> RenderableType:
    if not events:
        return Text("no events yet", style="dim")
    table = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False)
    table.add_column("Age", justify="right", no_wrap=True)
    table.add_column("Event", no_wrap=True)
    table.add_column("Job", justify="right")
    table.add_column("Worker")
    table.add_column("What", ratio=1)
    for event in events:
        table.add_row(format_duration(event["age_s"]), Text(event["kind"], style=EVENT_STYLES.get(event["kind"], "")),
                      str(event["job_id"] or "-"), event["worker_id"] or "-", event["summary"])
    return table


# -- formatting ---------------------------------------------------------------------------------
def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_bytes(value: int | None) -> str:
    if not value:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"
