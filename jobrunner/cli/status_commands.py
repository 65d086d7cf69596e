"""Status commands: `status` (live dashboard, or a `--json` snapshot) and `report` (a PNG of a job's run).

The logic lives in jobrunner.observe.snapshot (reading), jobrunner.observe.dashboard (rendering) and
jobrunner.observe.report (plotting); this module only parses options and loops for `--watch`.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from jobrunner.cli.main import main
from jobrunner.cli.job_commands import db_option

PRINT_WIDTH = 160


@main.command("status")
@click.argument("job_id", metavar="[JOB]", type=int, required=False)
@click.option("--watch/--no-watch", default=None,
              help="Refresh until Ctrl-C (exit code 0). [default: --watch on a terminal, else print once]")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable snapshot (docs/STATUS.md).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.option("--limit", "job_limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Jobs to show: every unfinished job, then the newest finished ones up to this.")
@click.option("--events", "event_limit", type=click.IntRange(min=0), default=12, show_default=True,
              help="Recent events to show.")
@click.option("--stale-after", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Flag a running worker not seen for this many seconds as stale.")
@db_option
def status_command(job_id, watch, as_json, interval, job_limit, event_limit, stale_after, db):
    """Show jobs, workers and recent events; read-only, safe beside running workers.

    JOB focuses on one job: its details, its workers, its events.

    \b
    Examples:
      flexjob status                    # live dashboard until Ctrl-C (on a terminal)
      flexjob status 3 --no-watch       # job 3, printed once
      flexjob status --json | jq '.jobs[] | {id, status, progress, eta_s}'
    """
    from jobrunner.observe.snapshot import SnapshotOptions, read_snapshot
    from jobrunner.store.queries import open_store_for_reading

    if as_json and watch:
        raise click.UsageError("--json prints one snapshot; it cannot be combined with --watch")
    engine = open_store_for_reading(db)
    options = SnapshotOptions(job_id=job_id, job_limit=job_limit, event_limit=event_limit, stale_after_s=stale_after)
    if as_json:
        click.echo(json.dumps(read_snapshot(engine, options), indent=2))
        return
    if watch is None:
        watch = sys.stdout.isatty()
    from rich.console import Console

    from jobrunner.observe.dashboard import render_dashboard

    # Printed into a pipe or a file, rich would assume 80 columns; the dashboard wants about 160.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = Console(width=PRINT_WIDTH if wide else None)
    if not watch:
        console.print(render_dashboard(read_snapshot(engine, options), width=console.width))
        return
    _watch(console, lambda: read_snapshot(engine, options), interval)


def _watch(console, read, interval: float) -> None:
    """Re-read and re-render every `interval` seconds; Ctrl-C leaves quietly with exit code 0.
    A store that cannot be read for a moment (a PostgreSQL restart) keeps the last screen, with the error."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text
    from sqlalchemy.exc import DBAPIError

    from jobrunner.observe.dashboard import render_dashboard

    # Ctrl-C must end the dashboard even when it lands inside a library call that catches the
    # KeyboardInterrupt (a database driver cleaning up), or when the shell started flexjob with
    # SIGINT ignored: the handler also sets a flag that the loop checks.
    interrupted = threading.Event()

    def on_interrupt(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        snapshot = read()
        with Live(render_dashboard(snapshot, width=console.width), console=console, auto_refresh=False,
                  redirect_stderr=False) as live:
            while not interrupted.wait(interval):
                try:
                    snapshot = read()
                    live.update(render_dashboard(snapshot, width=console.width), refresh=True)
                except DBAPIError as exc:
                    problem = Text(f"cannot read the job store (retrying): {exc.orig}", style="bold red")
                    live.update(Group(problem, render_dashboard(snapshot, width=console.width)), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)


@main.command("report")
@click.argument("job_id", metavar="JOB", type=int)
@click.option("-o", "--output", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG file to write. [default: report-JOB.png]")
@db_option
def report_command(job_id, out_path, db):
    """Plot a job's run: tokens/s per block over time with re-plans and crashes marked, and
    memory peaks (RSS, GPU) per block.

    \b
    Example:
      flexjob report 3 -o report.png
    """
    from jobrunner.observe.report import read_report_data, write_report
    from jobrunner.store.queries import open_store_for_reading

    data = read_report_data(open_store_for_reading(db), job_id)
    path = write_report(data, out_path or Path(f"report-{job_id}.png"))
    click.echo(f"wrote {path}: {len(data.blocks)} blocks, {len(data.policy_switches)} re-plans, "
               f"{len(data.crashes)} crashes or lease takeovers")
