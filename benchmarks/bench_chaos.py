"""Chaos suite: random SIGKILLs and stalls of workers on simulated machines lose and duplicate nothing.

    sudo python benchmarks/bench_chaos.py            # 2 jobs x 500 rows; >= 50 kills in all
    sudo python benchmarks/bench_chaos.py --quick    # 2 jobs x 60 rows, 10 kills, one stall per phase

Two jobs on a tiny generated model (`flexjob make-model tiny`), one greedy, one seeded sampling, in
this machine's default dtype, through the CLI only (`flexjob enqueue`, `work`, `results`):
  clean    one undisturbed worker on a SQLite file: the reference output and wall time;
  phase A  2 workers on one machine, SQLite file;
  phase B  4 workers on PostgreSQL, 2 simulated machines of 2 (tests/support/machines.py: pid and
           UTS namespaces, so each has its own host name and host id; its own FLEXJOB_HOME, working
           directory and --offload-dir). Within a machine a killed holder is taken over at once;
           between machines only when its lease runs out.
In each phase workers are SIGKILLed every few seconds (mostly shard holders) and replaced, and a
holder is now and then SIGSTOPped for longer than the lease, then resumed (tests/support/chaos.py).
With --strict-no-shared-fs (the default) the input file is renamed after enqueue and `results`
runs as a third machine (own FLEXJOB_HOME and working directory): the workers and the reader share
nothing but the store. Then: every row once and every column of the output but attempt,
block_seconds and finished_at identical to the clean run; no shard left leased. Reported: kills
(of holders), stalls, takeovers (process found dead / lease expired), writes refused by fencing
(commits among them), tokens resumed from checkpoints, an upper bound on redone decode steps
(each takeover loses at most --progress-every steps of its rows in flight), wall time vs clean.
Needs root (namespaces); PostgreSQL phase skipped with the reason when the server is unreachable.
The full size is for a quiet host: on a busy 2-core one the clean run alone takes ~6 min per job.
Results go to benchmarks/results/chaos.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.support.chaos import (ChaosPlan, generated_columns, orphaned_leases, run_chaos,  # noqa: E402
                                 tally_store)
from tests.support.cli_jobs import (code_prompts, enqueue_cli, postgres_unreachable, run_cli,  # noqa: E402
                                    store_url, tiny_model)
from tests.support.machines import namespaces_unavailable, start_machine  # noqa: E402

SAMPLING = {"greedy": (), "seeded": ("--temperature", "0.8", "--top-p", "0.95", "--seed", "1234")}


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    rows: int = 500                 # per job (one greedy, one seeded)
    shard_rows: int = 20
    max_new_tokens: int = 8
    block: int = 5                  # --gpu-batch-size of every worker
    progress_every: int = 2
    lease_s: float = 6.0
    kills_a: int = 20
    kills_b: int = 30
    stalls: int = 2                 # per phase
    gap_s: tuple[float, float] = (1.0, 3.0)
    strict_no_shared_fs: bool = True
    seed: int = 17

    def quick(self) -> ChaosConfig:
        return ChaosConfig(rows=60, shard_rows=6, max_new_tokens=12, kills_a=4, kills_b=6, stalls=1,
                           strict_no_shared_fs=self.strict_no_shared_fs, seed=self.seed)

    def work_args(self, url: str) -> list[str]:
        return ["--db", url, "--exit-when-idle", "--gpu-batch-size", str(self.block), "--progress-every",
                str(self.progress_every), "--lease", str(self.lease_s)]


def enqueue_jobs(cfg: ChaosConfig, url: str, model: Path, prompts: Path, where: Path) -> dict[str, int]:
    """The greedy and the seeded job, enqueued from `where` (a copy of the prompts, renamed away
    afterwards under --strict-no-shared-fs)."""
    where.mkdir(parents=True, exist_ok=True)
    local = shutil.copy(prompts, where / "prompts.parquet")
    jobs = {name: enqueue_cli(url, Path(local), model, "--shard-rows", str(cfg.shard_rows), "--max-new-tokens",
                              str(cfg.max_new_tokens), *args, cwd=where) for name, args in SAMPLING.items()}
    if cfg.strict_no_shared_fs:
        Path(local).rename(where / "prompts.parquet.gone")
    return jobs


def read_results(url: str, jobs: dict[str, int], reader: Path) -> dict[str, list[dict]]:
    """`flexjob results` of each job, run as its own machine (FLEXJOB_HOME and cwd of its own)."""
    (reader / "home").mkdir(parents=True, exist_ok=True)
    env = os.environ | {"FLEXJOB_HOME": str(reader / "home"), "PYTHONPATH": str(ROOT)}
    out = {}
    for name, job_id in jobs.items():
        path = reader / f"{name}.parquet"
        run_cli("results", str(job_id), "-o", str(path), "--force", "--db", url, env=env, cwd=reader)
        out[name] = generated_columns(path)
    return out


def clean_run(cfg: ChaosConfig, work: Path, model: Path, prompts: Path) -> tuple[dict, float]:
    with store_url("sqlite", work / "clean") as url:
        jobs = enqueue_jobs(cfg, url, model, prompts, work / "clean" / "enqueue")
        started = time.monotonic()
        run_cli("work", *cfg.work_args(url), "--offload-dir", str(work / "clean" / "offload"), cwd=work / "clean")
        seconds = time.monotonic() - started
        return read_results(url, jobs, work / "clean" / "reader"), seconds


def chaos_phase(cfg: ChaosConfig, name: str, backend: str, layout: list[tuple[str, int]], kills: int,
                work: Path, model: Path, prompts: Path, reference: dict) -> dict:
    """One phase: enqueue, run the machines under the plan's faults, read and check the results."""
    from jobrunner.store.db import open_store

    phase = work / name
    shutil.rmtree(phase, ignore_errors=True)
    with store_url(backend, phase) as url:
        jobs = enqueue_jobs(cfg, url, model, prompts, phase / "enqueue")
        db = open_store(url, must_exist=True)
        machines = [(start_machine(m, phase / m), n) for m, n in layout]
        plan = ChaosPlan(kills=kills, stalls=cfg.stalls, stall_s=cfg.lease_s * 1.6, gap_s=cfg.gap_s)
        try:
            tally = run_chaos(db, list(jobs.values()), machines, cfg.work_args(url), plan,
                              random.Random(f"{cfg.seed}-{name}"))
        finally:
            for machine, _ in machines:
                machine.shut_down()
        counts = tally_store(db, list(jobs.values()))
        orphans = orphaned_leases(db, list(jobs.values()))
        try:
            got = read_results(url, jobs, phase / "reader")
            mismatch = [j for j in jobs if got[j] != reference[j]]
            results_error = None
        except Exception as exc:  # noqa: BLE001 - an unfinished job's refusal is the finding to report
            mismatch, results_error = list(jobs), str(getattr(exc, "stderr", "") or exc).strip().splitlines()[-1:]
    takeovers = counts["takeovers_dead"] + counts["takeovers_expired"]
    return {"phase": name, "backend": backend, "machines": layout, **asdict(tally), **counts,
            "redone_steps_at_most": takeovers * cfg.progress_every, "orphaned_leases": orphans,
            "mismatched_jobs": mismatch, "results_error": results_error,
            "ok": not orphans and not mismatch and tally.kills == kills}


def bench(cfg: ChaosConfig, work: Path) -> dict:
    model = tiny_model(work / "model")
    prompts = code_prompts(work / "prompts.parquet", cfg.rows)
    reference, clean_s = clean_run(cfg, work, model, prompts)
    phases, skipped = [], {}
    if why := namespaces_unavailable():
        skipped["all"] = why
    else:
        phases.append(chaos_phase(cfg, "A", "sqlite", [("chaos-a1", 2)], cfg.kills_a, work, model, prompts,
                                  reference))
        if why := postgres_unreachable():
            skipped["B"] = why
        else:
            phases.append(chaos_phase(cfg, "B", "postgres", [("chaos-b1", 2), ("chaos-b2", 2)], cfg.kills_b,
                                      work, model, prompts, reference))
    for p in phases:
        p["wall_vs_clean"] = p["seconds"] / clean_s
    return {"config": asdict(cfg), "clean_seconds": clean_s, "phases": phases, "skipped": skipped,
            "rows_per_job": cfg.rows, "kills": sum(p["kills"] for p in phases)}


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(f"\n2 jobs (greedy, seeded) x {cfg['rows']} rows x {cfg['max_new_tokens']} tokens, lease {cfg['lease_s']} s;"
          f" clean run {result['clean_seconds']:.0f} s")
    head = ("phase", "workers", "kills", "holders", "stalls", "dead->", "expired->", "fenced", "commits",
            "resumed tok", "redone<=", "wall s", "x clean", "ok")
    print(" ".join(f"{h:>9}" for h in head))
    for p in result["phases"]:
        cells = (f"{p['phase']} {p['backend'][:2]}", sum(n for _, n in p["machines"]), p["kills"], p["holder_kills"],
                 p["stalls"], p["takeovers_dead"], p["takeovers_expired"], p["fenced_writes"], p["fenced_commits"],
                 p["resumed_tokens"], p["redone_steps_at_most"], f"{p['seconds']:.0f}", f"{p['wall_vs_clean']:.1f}",
                 p["ok"])
        print(" ".join(f"{str(c):>9}" for c in cells))
        if p["results_error"] or p["orphaned_leases"] or p["mismatched_jobs"]:
            print(f"   {p['phase']}: results {p['results_error']}, orphans {p['orphaned_leases'][:3]}, "
                  f"mismatched {p['mismatched_jobs']}")
    for phase, why in result["skipped"].items():
        print(f"phase {phase} skipped: {why}")
    print(f"kills in all: {result['kills']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 x 60 rows, 10 kills, one stall per phase")
    ap.add_argument("--strict-no-shared-fs", action=argparse.BooleanOptionalAction, default=True,
                    help="rename the input after enqueue; read the results as a third machine")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "flexjob-bench-chaos")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chaos.json")
    opts = ap.parse_args(argv)
    cfg = ChaosConfig(strict_no_shared_fs=opts.strict_no_shared_fs)
    result = bench(cfg.quick() if opts.quick else cfg, opts.work_dir)
    print_table(result)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {opts.out}")
    return 0 if result["phases"] and all(p["ok"] for p in result["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
