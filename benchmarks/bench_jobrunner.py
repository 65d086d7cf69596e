"""Job runner overheads: whole path vs the engine alone, per-block commit latency, enqueue memory.

    python benchmarks/bench_jobrunner.py                 # all three, table + JSON
    python benchmarks/bench_jobrunner.py --only commit   # one of: path, commit, enqueue

1. Whole path (enqueue -> work -> results, in one process, SQLite) against the engine alone on the
   same rows, policy and dtype. Both include loading the engine; the engine alone gets the rows in
   blocks sorted by length exactly as the worker forms them. Target: >= 95 %.
2. Per-block commit latency: writing a 16-row part (temp, fsync, rename, fsync dir) and the
   commit transaction (SQLite with synchronous=FULL; PostgreSQL if reachable), p50/p95.
3. Peak RSS of `flexjob enqueue` on a 1,000,000-row Parquet (os.wait4 of the child), next to the
   RSS of a child that only imports the same modules: enqueue streams row groups, so the difference
   stays bounded by one row group, not by the file.
Results go to benchmarks/results/jobrunner.json (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.pg_scratch import scratch_schema  # noqa: E402

CODE_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class LinkedList:", "# Parse the command line",
                "for index, item in enumerate(", "with open(path) as handle:", "raise ValueError(",
                "async def main():", "if __name__ == '__main__':", "return sorted(items, key="]


def bench_path(work: Path, *, size: str, layers: int, rows: int, max_new_tokens: int, block: int,
               dtype: str, repeats: int) -> dict:
    from engine.runtime.engine import Engine
    from engine.model.config import preset
    from engine.model.synthetic import make_model
    from engine.runtime.policy import Policy
    from engine.runtime.rows import GenerationParams, RowInput
    from jobrunner.store.db import open_store
    from jobrunner.io.enqueue import JobParams, enqueue
    from jobrunner.io.results import write_results
    from jobrunner.worker.loop import PlainReporter, Worker, WorkerConfig

    model = work / "model"
    if not (model / "config.json").is_file():
        make_model(preset(size, num_layers=layers), model)
    prompts = [f"{CODE_PROMPTS[i % len(CODE_PROMPTS)]} # {i}" for i in range(rows)]
    path = work / "prompts.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path)
    policy = Policy(gpu_batch_size=block)
    offload = work / "offload"

    # Warm the weight store conversion and the page cache for both runs alike.
    Engine(model, policy, dtype=dtype, offload_dir=offload).close()

    def engine_alone() -> tuple[float, int]:
        started = time.perf_counter()
        with Engine(model, policy, dtype=dtype, offload_dir=offload) as engine:
            ids = [tuple(x) for x in engine.tokenizer(prompts).input_ids]
            order = sorted(range(rows), key=lambda i: (len(ids[i]), i))
            params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
            results = engine.generate([RowInput(row_id=i, prompt_ids=ids[i]) for i in order], params)
        return time.perf_counter() - started, sum(len(r.generated_ids) for r in results)

    db = open_store(f"sqlite:///{work / 'bench.db'}")

    def whole_path() -> tuple[float, int]:
        started = time.perf_counter()
        job = enqueue(db, path, model_dir=model, params=JobParams(max_new_tokens=max_new_tokens, dtype=dtype),
                      shard_rows=rows, force=True).job
        summary = Worker(db, WorkerConfig(policy=policy, offload_dir=offload, exit_when_idle=True),
                         reporter=PlainReporter(open(os.devnull, "w"))).run()
        write_results(db, job.id, work / "out.parquet", force=True)  # each repeat rewrites it
        return time.perf_counter() - started, summary.tokens

    # Alternate the two and keep the best of each: the host is shared, so single runs are noisy.
    engine_runs, path_runs = [], []
    for _ in range(repeats):
        engine_runs.append(engine_alone())
        path_runs.append(whole_path())
    engine_s, engine_tokens = min(engine_runs)
    path_s, path_tokens = min(path_runs)
    return {"rows": rows, "max_new_tokens": max_new_tokens, "block": block, "dtype": dtype,
            "model": f"{size} x{layers} layers", "repeats": repeats, "engine_s": engine_s,
            "engine_tokens_per_s": engine_tokens / engine_s, "path_s": path_s,
            "path_tokens_per_s": path_tokens / path_s, "path_tokens": path_tokens,
            "ratio": (path_tokens / path_s) / (engine_tokens / engine_s)}


def bench_commit(work: Path, *, blocks: int, url: str | None = None) -> dict:
    from jobrunner import store
    from jobrunner.store.db import open_store
    from jobrunner.io.parts import ResultRow, part_name, rows_to_table, to_parquet_bytes
    from jobrunner.store import PartRecord

    db = open_store(url or f"sqlite:///{work / 'commit.db'}")
    rows_per_block = 16
    job, _ = store.enqueue_job(db, store.NewJob(
        name="bench", priority=0, job_key=f"bench-{time.time()}", input_path="-", input_fingerprint="-",
        input_size=0, input_mtime_ns=0, prompt_column="prompt", id_column=None, model_dir="-",
        model_fingerprint="-", params={}, results_dir="", shard_rows=blocks * rows_per_block,
        total_rows=blocks * rows_per_block))
    worker = store.register_worker(db, device="bench")
    lease = store.claim_shard(db, worker, lease_s=3600)
    write_s, commit_s = [], []
    for b in range(blocks):
        rows = [ResultRow(row=b * rows_per_block + i, id=None, prompt="p" * 200, completion="c" * 400,
                          completion_tokens=64, prompt_tokens=50, finish_reason="length", error=None, attempt=1,
                          block_seconds=1.0, finished_at=datetime.now(UTC)) for i in range(rows_per_block)]
        t0 = time.perf_counter()
        encoded = to_parquet_bytes(rows_to_table(rows, None))
        t1 = time.perf_counter()
        store.commit_block(db, lease, PartRecord(path=part_name(0, lease.attempt, b), data=encoded.data,
                                                 row_ids=tuple(r.row for r in rows), failed_rows=0,
                                                 generated_tokens=64 * rows_per_block, size_bytes=len(encoded.data),
                                                 sha256=encoded.sha256, block_seconds=1.0))
        t2 = time.perf_counter()
        write_s.append(t1 - t0)
        commit_s.append(t2 - t1)

    def pct(xs, q):
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000

    return {"backend": db.url.get_backend_name(), "blocks": blocks,
            "part_write_ms_p50": pct(write_s, 0.5), "part_write_ms_p95": pct(write_s, 0.95),
            "commit_ms_p50": pct(commit_s, 0.5), "commit_ms_p95": pct(commit_s, 0.95),
            "commit_ms_mean": statistics.mean(commit_s) * 1000}


# Runs the measured command as its child and reports that child's peak RSS. The indirection is
# needed because Linux books the old address space's high-water mark at exec: a command started
# straight from this process (which has torch loaded) would report this process's peak instead.
_LAUNCHER = ("import os, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:])\n"
             "_, status, usage = os.wait4(p.pid, 0)\n"
             "print('peak_rss_kib', usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n")


def _child_peak_rss(args: list[str], cwd: Path) -> tuple[int, float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    *lines, last = done.stdout.strip().splitlines()
    _, kib, code = last.split()
    if int(code) != 0:
        raise RuntimeError(f"{args} failed: {done.stdout}{done.stderr}")
    return int(kib) * 1024, seconds, "\n".join(lines).strip()


def _write_prompts_file(path: Path, rows: int, group: int) -> None:
    schema = pa.schema([("prompt", pa.string()), ("id", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, group):
            n = min(group, rows - start)
            writer.write_table(pa.table({
                "prompt": [f"{CODE_PROMPTS[(start + i) % len(CODE_PROMPTS)]} # request {start + i}" * 3
                           for i in range(n)],
                "id": pa.array(range(start, start + n), pa.int64())}, schema=schema))


def bench_enqueue(work: Path, *, rows: int, model: Path | None) -> dict:
    """Peak RSS at rows/10 and at rows: bounded memory means the two are about the same."""
    from engine.model.config import preset
    from engine.model.synthetic import make_model

    group = 65_536
    if model is None:
        model = work / "model-tiny"
        if not (model / "config.json").is_file():
            make_model(preset("tiny"), model)
    cli = [sys.executable, "-c", "from jobrunner.cli import main; main()"]
    baseline, _, _ = _child_peak_rss([sys.executable, "-c", "import jobrunner.cli, jobrunner.io.enqueue, pyarrow.parquet"],
                                     work)
    runs = []
    for n in (rows // 10, rows):
        path = work / f"prompts-{n}.parquet"
        if not path.is_file():
            _write_prompts_file(path, n, group)
        peak, seconds, output = _child_peak_rss(cli + ["enqueue", str(path), "--model", str(model), "--id-column",
                                                       "id", "--db", f"sqlite:///{work / 'enqueue.db'}", "--force"], work)
        runs.append({"rows": n, "file_mib": path.stat().st_size / 2**20, "peak_rss_mib": peak / 2**20,
                     "enqueue_overhead_mib": (peak - baseline) / 2**20, "seconds": seconds, "output": output})
    return {"row_group_rows": group, "import_only_rss_mib": baseline / 2**20, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["path", "commit", "enqueue"], default=None)
    ap.add_argument("--dir", type=Path, default=None, help="Work directory (default: a temporary one).")
    ap.add_argument("--size", default="125m")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=2, help="Runs of each side of the path comparison.")
    ap.add_argument("--commit-blocks", type=int, default=100)
    ap.add_argument("--enqueue-rows", type=int, default=1_000_000)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="PostgreSQL URL for the commit benchmark ('' to skip).")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-jobrunner-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"host": os.uname().nodename, "cpus": os.cpu_count()}
    if args.only in (None, "path"):
        r = report["path"] = bench_path(work, size=args.size, layers=args.layers, rows=args.rows,
                                         max_new_tokens=args.max_new_tokens, block=args.block, dtype=args.dtype,
                                         repeats=args.repeats)
        print(f"whole path vs engine alone ({r['model']}, {r['rows']} rows x {r['max_new_tokens']} tokens, "
              f"block {r['block']}, {r['dtype']})")
        print(f"  engine alone: {r['engine_tokens_per_s']:8.1f} tokens/s  ({r['engine_s']:.2f} s incl. load)")
        print(f"  whole path  : {r['path_tokens_per_s']:8.1f} tokens/s  ({r['path_s']:.2f} s enqueue+work+results)")
        print(f"  ratio       : {100 * r['ratio']:.1f} %  (target >= 95 %)")
    if args.only in (None, "commit"):
        results = [bench_commit(work, blocks=args.commit_blocks)]
        if args.pg:
            try:
                with scratch_schema(args.pg) as url:
                    results.append(bench_commit(work, blocks=args.commit_blocks, url=url))
            except Exception as exc:  # noqa: BLE001 - the server is optional here
                print(f"  (PostgreSQL skipped: {exc})")
        report["commit"] = results
        print(f"per-block commit latency (16-row part), ms   {'p50':>8} {'p95':>8}")
        for r in results:
            print(f"  {r['backend']:<10} part encode (Parquet)    {r['part_write_ms_p50']:8.2f} {r['part_write_ms_p95']:8.2f}")
            print(f"  {r['backend']:<10} commit transaction       {r['commit_ms_p50']:8.2f} {r['commit_ms_p95']:8.2f}")
    if args.only in (None, "enqueue"):
        model = work / "model" if (work / "model" / "config.json").is_file() else None
        r = report["enqueue"] = bench_enqueue(work, rows=args.enqueue_rows, model=model)
        print(f"enqueue peak RSS (row groups of {r['row_group_rows']:,}; imports alone "
              f"{r['import_only_rss_mib']:.0f} MiB)")
        for run in r["runs"]:
            print(f"  {run['rows']:>10,} rows ({run['file_mib']:5.0f} MiB): peak {run['peak_rss_mib']:.0f} MiB, "
                  f"+{run['enqueue_overhead_mib']:.0f} MiB over imports, {run['seconds']:.1f} s")
    out = ROOT / "benchmarks" / "results" / "jobrunner.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
