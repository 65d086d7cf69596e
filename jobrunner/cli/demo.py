"""`flexjob demo`: the whole path on a generated model and an embedded SQLite store.

make a small random-weight OPT ─▶ write sample prompts (with a few bad rows) ─▶ enqueue
─▶ work until idle ─▶ show the status dashboard ─▶ write results ─▶ print a few completions.
Everything lives in one directory (a temporary one unless --dir is given), so it is easy to
inspect and to delete.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from engine.runtime.policy import Policy

DEMO_PROMPTS = [
    "def fibonacci(n):", "import os\nimport sys\n", "class LinkedList:", "# Parse the command line",
    "for index, item in enumerate(", "with open(path) as handle:", "raise ValueError(", "async def main():",
    "if __name__ == '__main__':", "return sorted(items, key=", "try:\n    import json\nexcept",
    "while queue:", "self.assertEqual(", "print(f'", "lambda x:", "@dataclass\nclass Point:",
]


@dataclass(frozen=True, kw_only=True)
class DemoResult:
    directory: Path
    job_id: int
    results_path: Path
    rows: int
    error_rows: int
    completions: list[tuple[str | None, str | None, str]]  # (prompt, completion or None, finish reason)


def write_demo_prompts(path: Path, copies: int = 2) -> Path:
    """The sample prompts (repeated), plus a null and an empty one to show error rows."""
    prompts = DEMO_PROMPTS * copies + [None, ""]
    pq.write_table(pa.table({"prompt": prompts, "id": [f"demo-{i}" for i in range(len(prompts))]}), path,
                   row_group_size=16)
    return path


def run_demo(directory: Path, *, say: Callable[[str], None] = print, model_size: str = "125m",
             num_layers: int = 2, hidden_size: int = 64, max_new_tokens: int = 16,
             show_status: Callable[[dict], None] | None = None) -> DemoResult:
    from engine.model.config import preset
    from engine.model.synthetic import make_model
    from jobrunner import store
    from jobrunner.store.db import open_store
    from jobrunner.io.enqueue import JobParams, enqueue
    from jobrunner.io.results import write_results
    from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig

    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    if not (model_dir / "config.json").is_file():
        say(f"making a random-weight OPT ({model_size}, {num_layers} layers, hidden {hidden_size}) in {model_dir}")
        make_model(preset(model_size, num_layers=num_layers, hidden_size=hidden_size), model_dir)
    prompts = write_demo_prompts(directory / "prompts.parquet")
    db = open_store(f"sqlite:///{directory / 'flexjob.db'}")
    result = enqueue(db, prompts, model_dir=model_dir, id_column="id",
                     params=JobParams(max_new_tokens=max_new_tokens), shard_rows=16, name="demo")
    job = result.job
    say(f"enqueued job {job.id}: {job.total_rows} rows" + ("" if result.created else " (already there)"))
    config = WorkerConfig(policy=Policy(gpu_batch_size=8), offload_dir=directory / "offload",
                          exit_when_idle=True, progress_every=4)
    summary = Worker(db, config, reporter=PlainReporter()).run()
    job = store.get_job(db, job.id)
    say(f"job {job.id} {job.status.value}: {job.done_rows}/{job.total_rows} rows, {job.failed_rows} error rows, "
        f"{summary.tokens} tokens generated")
    if show_status is not None:  # what `flexjob status` shows for the finished run
        from jobrunner.observe.snapshot import read_snapshot
        show_status(read_snapshot(db))
    out = directory / "results.parquet"
    written = write_results(db, job.id, out, force=True)  # the demo's own file, from an earlier run
    table = pq.read_table(out, columns=["prompt", "completion", "finish_reason"]).to_pylist()
    samples = [(r["prompt"], r["completion"], r["finish_reason"]) for r in table[:3] + table[-2:]]
    say(f"wrote {written.rows} rows to {out}")
    for prompt, completion, reason in samples:
        say(f"  {prompt!r} -> {completion!r} [{reason}]")
    return DemoResult(directory=directory, job_id=job.id, results_path=out, rows=written.rows,
                      error_rows=written.error_rows, completions=samples)
