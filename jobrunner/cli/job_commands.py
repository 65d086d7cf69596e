"""Job commands: `enqueue`, `work`, `results`, `jobs`, `cancel`, `retry`, `demo`.

Each parses options, opens the store and calls the library (jobrunner.io.enqueue, .worker, .results,
.store, .demo); nothing here holds logic a test would need to reach without the CLI.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from jobrunner.cli.main import main
from engine.runtime.devices import DTYPE_NAMES
from jobrunner.cli.engine_commands import build_policy, default_offload_dir, host_profile, policy_options

db_option = click.option("--db", default=None, envvar="FLEXJOB_DB",
                         help="Job store URL: sqlite:///path.db or postgresql://user@host/db. "
                              "[default: sqlite:///$FLEXJOB_HOME/flexjob.db]")


def _open(db, *, must_exist: bool = False):
    """The store; commands that only read or change existing jobs pass must_exist (never create one)."""
    from jobrunner.store.db import open_store
    return open_store(db, must_exist=must_exist)


@main.command("enqueue")
@click.argument("input_path", metavar="PROMPTS", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory (OPT, Llama, Mistral, Qwen2).")
@click.option("--column", default="prompt", show_default=True, help="Column holding the prompts.")
@click.option("--id-column", default=None, help="Column copied to the results as `id`.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stop", "stop", multiple=True, help="Cut the completion at this text (repeatable).")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Compute dtype (part of the job: every worker uses it). Default: what this machine "
                   "computes fastest: float16 with CUDA, bfloat16 on CPUs with native bf16, else float32.")
@click.option("--truncate", type=click.Choice(["error", "left"]), default="error", show_default=True,
              help="Prompts too long for the model: error rows, or cut from the left.")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher runs first.")
@click.option("--shard-rows", type=int, default=1000, show_default=True, help="Rows per shard (unit of claim).")
@click.option("--name", default=None, help="A name for the job (default: the file name).")
@click.option("--force", is_flag=True, help="Create a new job even if the same one exists.")
@click.option("--limit", type=int, default=None, help="Only the first N rows (a quick trial).")
@db_option
def enqueue_command(input_path, model_dir, column, id_column, max_new_tokens, temperature, top_p, seed, stop,
                    dtype, truncate, priority, shard_rows, name, force, limit, db):
    """Create a job from a file of prompts (idempotent: the same file and parameters return the
    existing job).

    PROMPTS is a Parquet file, a CSV file or a JSONL file (.jsonl) with a prompt column, or an
    OpenAI Batch API input file (/v1/completions requests; every line must carry the same body
    parameters, which replace --max-new-tokens, --temperature, --top-p, --seed and --stop).

    \b
    Examples:
      flexjob enqueue prompts.parquet --model models/opt-1.3b --max-new-tokens 64 --seed 1
      flexjob enqueue batch.jsonl --model models/opt-1.3b --limit 20
    """
    from jobrunner.io.enqueue import JobParams, enqueue

    from engine.runtime.devices import default_dtype_name

    params = JobParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       stop=tuple(stop), dtype=dtype or default_dtype_name(), truncate=truncate)
    result = enqueue(_open(db), input_path, model_dir=model_dir, column=column, id_column=id_column,
                     params=params, priority=priority, shard_rows=shard_rows, name=name, force=force,
                     limit=limit)
    job = result.job
    shards = -(-job.total_rows // job.shard_rows)
    if not result.created:
        click.echo(f"job {job.id} already exists for this file and these parameters "
                   f"({job.status.value}, {job.done_rows}/{job.total_rows} rows); use --force for a new one")
        return
    click.echo(f"enqueued job {job.id} ({job.name}): {job.total_rows} rows in {shards} shards")
    if result.problem_rows:
        detail = ", ".join(f"{n} {kind.removeprefix('prompt is ')}" for kind, n in sorted(result.problem_rows.items()))
        click.echo(f"note: {sum(result.problem_rows.values())} rows will be error rows ({detail})")


@main.command("work")
@policy_options
@click.option("--exit-when-idle", is_flag=True,
              help="Exit when nothing is left to do: every job finished, or its shards held by live workers "
                   "(waits for a lease that will run out, then takes the shard over).")
@click.option("--max-jobs", type=int, default=None, help="Exit after working on this many jobs.")
@click.option("--lease", "lease_s", type=float, default=60.0, show_default=True, help="Lease length in seconds.")
@click.option("--progress-every", type=int, default=16, show_default=True,
              help="Save generated tokens of rows in flight every N decode steps.")
@click.option("--replan/--no-replan", default=True, show_default=True,
              help="Re-plan the policy when measured bandwidth drifts from this host's stored profile.")
@db_option
def work_command(percent, gpu_batch_size, num_gpu_batches, gpu_mem, cpu_mem, offload_dir, overlap,
                 cpu_cache_compute, compress_weight, compress_cache, compress_bits, compress_group_size,
                 exit_when_idle, max_jobs, lease_s, progress_every, replan, db):
    """Claim shards and generate until stopped (SIGTERM/Ctrl-C save progress and exit).

    \b
    Example:
      flexjob work --gpu-mem 8 --cpu-mem 30 --percent 0 100 100 0 100 0 --gpu-batch-size 16
    """
    from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig
    from jobrunner.worker.replan import ProfileReplanner, stored_profile
    from jobrunner.worker.store_retry import StoreRetry

    explicit = (percent or gpu_batch_size is not None or num_gpu_batches is not None or compress_weight
                or compress_cache or cpu_cache_compute)
    # Without policy flags the planner chooses, from this host's profile (measured on first use).
    policy = build_policy(percent, gpu_batch_size, num_gpu_batches, overlap, cpu_cache_compute, compress_weight,
                          compress_cache, compress_bits, compress_group_size, command="work") if explicit else None
    offload_dir = default_offload_dir(offload_dir)
    hardware = host_profile(offload_dir) if policy is None else stored_profile(offload_dir)
    click.echo(f"policy: {policy.describe()} (from the flags)" if policy is not None else
               "policy: planned for each job's model from this host's profile (flags such as "
               "--gpu-batch-size fix it instead)", err=True)
    config = WorkerConfig(policy=policy, hardware=hardware, gpu_mem_gib=gpu_mem, cpu_mem_gib=cpu_mem,
                          offload_dir=offload_dir, exit_when_idle=exit_when_idle, max_jobs=max_jobs,
                          lease_s=lease_s, progress_every=progress_every, device_lock=_gpu_lock_name())
    replanner = (ProfileReplanner(hardware, gpu_mem_gib=gpu_mem, cpu_mem_gib=cpu_mem)
                 if replan and hardware is not None else None)
    reporter = _RichReporter() if sys.stderr.isatty() else PlainReporter()
    # A worker outlives a store that is restarting as it starts, as it does one that drops later.
    store_engine = StoreRetry(budget_s=lease_s, report=reporter.message)(_open, db)
    summary = Worker(store_engine, config, reporter=reporter, replanner=replanner).run()
    click.echo(f"worker stopped ({summary.stopped_by}): {summary.shards_done} shards, {summary.rows_done} rows, "
               f"{summary.tokens} tokens", err=True)
    if summary.stopped_by == "signal":
        sys.exit(0)


def _gpu_lock_name() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None  # CPU workers may share a host; one worker per GPU is what matters
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return f"cuda-{uuid}" if uuid is not None else f"cuda-{index}"


class _RichReporter:
    """A progress bar (rows, tokens/s, ETA) for a terminal."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = Console(stderr=True, log_path=False)  # our source file:line means nothing to a user
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self.console)
        self.progress.start()
        self.task = None
        self.rows = self.tokens = 0
        self._window: list[tuple[float, int]] = []

    def message(self, text: str) -> None:
        self.progress.console.log(text)

    def shard_started(self, *, job, lease, rows, already_done, resumed_tokens) -> None:
        # The bar covers the whole job (other workers' rows included, as of this claim).
        desc = f"job {job.id} ({job.name}) shard {lease.shard_index}"
        if self.task is None:
            self.task = self.progress.add_task(desc, total=job.total_rows, completed=job.done_rows, rate="")
        else:
            self.progress.update(self.task, description=desc, total=job.total_rows, completed=job.done_rows)

    def step(self, *, new_tokens: int) -> None:
        import time
        self.tokens += new_tokens
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < 10] + [(now, new_tokens)]
        span = now - self._window[0][0]
        if self.task is not None and span > 0:
            self.progress.update(self.task, rate=f"{sum(n for _, n in self._window) / span:.1f} tok/s")

    def block_committed(self, *, rows, failed, tokens, seconds) -> None:
        self.rows += rows
        if self.task is not None:
            self.progress.advance(self.task, rows)

    def close(self) -> None:
        self.progress.stop()


@main.command("results")
@click.argument("job_id", metavar="JOB", type=int)
@click.option("-o", "--output", "out_path", required=True, type=click.Path(path_type=Path),
              help="File to write: .parquet, .csv, or .jsonl (OpenAI Batch API output format).")
@click.option("--partial", is_flag=True, help="Write the rows done so far of an unfinished job.")
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@db_option
def results_command(job_id, out_path, partial, force, db):
    """Merge a job's results into one file in input order (every row checked once).

    \b
    Examples:
      flexjob results 1 -o out.parquet
      flexjob results 1 -o out.jsonl          # OpenAI batch output lines
      flexjob results 1 -o partial.csv --partial
    """
    from jobrunner.io.results import write_results

    summary = write_results(_open(db, must_exist=True), job_id, out_path, partial=partial, force=force)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(summary.finish_reasons.items()))
    missing = f"; {summary.missing_rows} rows not done yet" if summary.missing_rows else ""
    click.echo(f"wrote {summary.rows} rows to {summary.path} ({reasons}){missing}")


@main.command("jobs")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["queued", "running", "completed", "failed", "cancelling", "cancelled"]))
@click.option("--limit", type=int, default=50, show_default=True)
@db_option
def jobs_command(statuses, limit, db):
    """List jobs, newest first.

    \b
    Example:
      flexjob jobs
      FLEXJOB_DB=postgresql://app@db/jobs flexjob jobs
    """
    from jobrunner import store
    from jobrunner.store.models import JobStatus

    jobs = store.list_jobs(_open(db, must_exist=True), statuses=[JobStatus(s) for s in statuses] or None, limit=limit)
    if not jobs:
        click.echo("no jobs")
        return
    click.echo(f"{'id':>4}  {'status':<10}  {'done':>15}  {'errors':>6}  {'created (UTC)':<19}  name")
    for job in jobs:
        click.echo(f"{job.id:>4}  {job.status.value:<10}  {f'{job.done_rows}/{job.total_rows}':>15}  "
                   f"{job.failed_rows:>6}  {job.created_at:%Y-%m-%d %H:%M:%S}  {job.name}"
                   + (f"  ({job.error})" if job.error else ""))


@main.command("cancel")
@click.argument("job_id", metavar="JOB", type=int)
@db_option
def cancel_command(job_id, db):
    """Cancel a job; workers holding its shards stop at their next heartbeat.

    \b
    Example:
      flexjob cancel 3
    """
    from jobrunner import store

    job = store.cancel_job(_open(db, must_exist=True), job_id)
    click.echo(f"job {job.id} is {job.status.value}")


@main.command("retry")
@click.argument("job_id", metavar="JOB", type=int)
@click.option("--failed-rows", is_flag=True,
              help="Also regenerate the blocks that hold error rows (not those whose prompt is the problem).")
@click.option("--all", "all_rows", is_flag=True,
              help="With --failed-rows: also the error rows whose prompt is null, empty or too long.")
@db_option
def retry_command(job_id, failed_rows, all_rows, db):
    """Reopen a failed or cancelled job, and regenerate the rows of missing or damaged parts.

    \b
    Example:
      flexjob retry 3
      flexjob retry 3 --failed-rows
      flexjob retry 3 --failed-rows --all
    """
    from jobrunner.io.results import retry

    if all_rows and not failed_rows:
        raise click.UsageError("--all goes with --failed-rows")
    report = retry(_open(db, must_exist=True), job_id, failed_rows=failed_rows, all_rows=all_rows)
    for line in report.lines:
        click.echo(line)


@main.command("demo")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep everything in this directory (default: a temporary one, deleted afterwards).")
def demo_command(directory):
    """The whole path on a generated model: make-model, enqueue, work, status, results.

    \b
    Example:
      flexjob demo
      flexjob demo --dir demo-run
    """
    import tempfile

    from rich.console import Console

    from jobrunner.observe.dashboard import render_dashboard
    from jobrunner.cli.demo import run_demo

    console = Console() if sys.stdout.isatty() else Console(width=160)  # a pipe gets the full table

    def show_status(snapshot: dict) -> None:
        console.print(render_dashboard(snapshot, width=console.width))

    if directory is not None:
        run_demo(directory, say=click.echo, show_status=show_status)
        click.echo(f"everything is in {directory}")
        return
    with tempfile.TemporaryDirectory(prefix="flexjob-demo-") as tmp:
        run_demo(Path(tmp), say=click.echo, show_status=show_status)
    click.echo(f"{tmp} was temporary and is deleted now; `flexjob demo --dir DIR` keeps the model, "
               "store and results")
