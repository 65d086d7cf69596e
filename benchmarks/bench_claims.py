"""Claim throughput: 8 concurrent claimer processes on one job of single-row shards.

    python benchmarks/bench_claims.py                      # 2000 shards, SQLite file and PostgreSQL
    python benchmarks/bench_claims.py --shards 200 --backends sqlite

Each claimer claims a shard with the store's claim_shard (what `flexjob work` calls) and completes
it at once with commit_block and a tiny part, until none is left (tests/support/claimers.py). The
job is made with `flexjob make-model tiny` and `flexjob enqueue --shard-rows 1`. The figure is
claims (each with its commit) per second of wall time, from the claimers' common start to the last
one's end, best of --repeats; the backends alternate within each repeat. Then every shard must have
been claimed exactly once: attempt 1 and done in the store, once in the claimers' logs. Store
errors that the worker retries (e.g. a deadlock PostgreSQL detected and broke) are retried alike and
counted in the table.
PostgreSQL is skipped (with the reason) when the server is unreachable.
Results go to benchmarks/results/claims.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.claimers import double_claims, run_claimers  # noqa: E402
from tests.support.cli_jobs import code_prompts, enqueue_cli, postgres_unreachable, store_url, tiny_model  # noqa: E402

BACKENDS = ("sqlite", "postgres")


def measure(backend: str, work: Path, model: Path, prompts: Path, claimers: int) -> dict:
    """One run on a fresh store: enqueue, claim everything, check every shard was claimed once."""
    from jobrunner.store.db import open_store

    with store_url(backend, work / backend) as url:
        job_id = enqueue_cli(url, prompts, model, "--shard-rows", "1")
        run = run_claimers(url, claimers)
        checks = double_claims(open_store(url, must_exist=True), job_id, run)
    latencies = sorted(ms for log in run.logs for ms in log.claim_ms)
    return {"backend": backend, "claimers": claimers, "claims": run.claims, "seconds": run.seconds,
            "claims_per_s": run.claims_per_s, "claim_ms_p50": statistics.median(latencies),
            "claim_ms_p95": latencies[int(0.95 * (len(latencies) - 1))],
            "per_claimer": [len(log.claims) for log in run.logs], "retried": dict(run.retried),
            "retries": sum(run.retried.values()), **checks,
            "double_claims": len(checks["attempts_over_1"]) + len(checks["logged_twice"]),
            "ok": not (checks["attempts_over_1"] or checks["not_done"] or checks["logged_twice"]
                       or checks["never_logged"]) and run.claims == checks["shards"]}


def bench(*, shards: int, claimers: int, repeats: int, backends: tuple[str, ...], work: Path) -> dict:
    model = tiny_model(work / "model")
    prompts = code_prompts(work / "prompts.parquet", shards)
    skipped = {}
    if "postgres" in backends and (why := postgres_unreachable()):
        skipped["postgres"] = why
    runs = {b: [] for b in backends if b not in skipped}
    for _ in range(repeats):
        for backend in runs:  # alternated: a shared host's noise hits both
            runs[backend].append(measure(backend, work, model, prompts, claimers))
    best = {b: max(rs, key=lambda r: r["claims_per_s"]) | {"all_claims_per_s": [r["claims_per_s"] for r in rs],
                                                           "ok": all(r["ok"] for r in rs)}
            for b, rs in runs.items()}
    return {"shards": shards, "claimers": claimers, "repeats": repeats, "rows": list(best.values()),
            "skipped": skipped}


def print_table(result: dict) -> None:
    print(f"\n{result['claimers']} claimers, {result['shards']} single-row shards, best of {result['repeats']}")
    print(f"{'backend':<10} {'claims/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'claims':>7} {'double':>7} "
          f"{'retried':>7} {'per claimer':<30} ok")
    for r in result["rows"]:
        print(f"{r['backend']:<10} {r['claims_per_s']:>9.1f} {r['claim_ms_p50']:>7.1f} {r['claim_ms_p95']:>7.1f} "
              f"{r['claims']:>7} {r['double_claims']:>7} {r['retries']:>7} {str(r['per_claimer']):<30} {r['ok']}")
        if r["retried"]:
            print(f"{'':<10} retried store errors: {r['retried']}")
    for backend, why in result["skipped"].items():
        print(f"{backend:<10} skipped: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--claimers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma list of sqlite, postgres")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "flexjob-bench-claims")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "claims.json")
    opts = ap.parse_args(argv)
    result = bench(shards=opts.shards, claimers=opts.claimers, repeats=opts.repeats,
                   backends=tuple(b for b in opts.backends.split(",") if b), work=opts.work_dir)
    print_table(result)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {opts.out}")
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
