"""Planner benchmark: solve time and choice per case, LP vs brute-force grid, and the planner
against a sweep of hand-written policies at the same budgets (all under flexjob's cost model).

    python benchmarks/bench_planner.py [--out benchmarks/results/bench_planner.json] [--host-profile FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support.planner_grid
from engine.planning.cost_model import estimate  # noqa: E402
from engine.errors import BudgetError
from engine.planning.hardware import HardwareProfile, t4_flexgen
from engine.model.config import preset
from engine.planning.planner import budgets_bytes, plan, shapes, solve_lp
from tests.support.planner_grid import grid_search
from engine.runtime.policy import Policy

# A 2-vCPU AMD EPYC Zen4 with AVX512-BF16, as measured on 2026-11-26 (bf16 410 GFLOP/s, weight streaming
# 18 GB/s, O_DIRECT reads 1.1 GB/s): a small CPU-only host with a cloud disk.
NOTES_HOST = HardwareProfile(host="zen4-2vcpu", source="measured 2026-11-26",
                             disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                             matmul_flops={"cpu": {"bfloat16": 4.1e11, "float32": 1.38e11}},
                             cpu_attention_gbps=10.0, dequant_gbps=5.0, op_overhead_s=5e-6,
                             cpu_mem_gib=23, disk_free_gib=200)

PLAN_CASES = [  # (size, hardware, gpu GiB, cpu GiB, disk GiB, prompt, gen)
    ("175b", "t4", 16, 200, 1500, 512, 32),
    ("30b", "t4", 16, 200, 1500, 512, 32),
    ("6.7b", "t4", 16, 200, 1500, 512, 32),
    ("1.3b", "notes", None, 2, 50, 128, 32),
    ("1.3b", "notes", None, 8, 50, 128, 32),
    ("6.7b", "notes", None, 8, 100, 128, 32),
    ("13b", "notes", None, 16, 100, 128, 32),
]


def _hw(name: str, host: HardwareProfile | None) -> HardwareProfile:
    return {"t4": t4_flexgen(), "notes": NOTES_HOST}.get(name) or host


def plan_cases(host: HardwareProfile | None) -> list[dict]:
    out = []
    cases = PLAN_CASES + ([("1.3b", "host", None, 4, 50, 128, 32)] if host else [])
    for size, hw_name, gpu, cpu, disk, s, n in cases:
        cfg, hw = preset(size), _hw(hw_name, host)
        t0 = time.perf_counter()
        try:
            p = plan(cfg, hw, gpu_mem_gib=gpu, cpu_mem_gib=cpu, disk_mem_gib=disk, prompt_len=s, gen_len=n)
            row = {"policy": p.policy.describe(), "tokens_per_s": p.tokens_per_s, "lps": p.solved,
                   "pruned": p.skipped, "peak_gib": p.peak_gib, "bottleneck": p.estimate.bottleneck}
        except BudgetError as exc:
            row = {"error": str(exc)}
        row.update(model=cfg.name, hardware=hw.host, budgets=[gpu, cpu, disk], prompt_len=s, gen_len=n,
                   seconds=time.perf_counter() - t0)
        out.append(row)
    return out


def lp_vs_grid() -> list[dict]:
    out = []
    for size in ("1.3b", "13b", "66b"):
        for hw in (t4_flexgen(), NOTES_HOST):
            model_gib = 2 * preset(size).param_count() / 2 ** 30
            limits = budgets_bytes(hw, 0.25 * model_gib + 1 if hw.has_gpu else None, 0.5 * model_gib + 1,
                                   3 * model_gib)
            for sh in shapes(hw, prompt_len=256, gen_len=32, gpu_batch_sizes=(4, 32), num_gpu_batches=(1, 8),
                             compress_options=(False, True))[::3]:
                t0 = time.perf_counter()
                lp = solve_lp(preset(size), hw, sh, limits)
                t1 = time.perf_counter()
                grid = grid_search(preset(size), hw, sh, limits)
                t2 = time.perf_counter()
                out.append({"model": size, "hardware": hw.host,
                            "shape": f"{sh.gpu_batch_size}x{sh.num_gpu_batches} cw={sh.compress_weight} "
                                     f"ca={sh.cpu_cache_compute}",
                            "lp_s": lp and lp[0], "grid_s": grid and grid[0],
                            "gap": (grid[0] / lp[0] - 1) if lp and grid else None,
                            "lp_solve_s": t1 - t0, "grid_solve_s": t2 - t1})
    return out


def sweep_13b(hw: HardwareProfile, cpu_mem: float, gpu_mem: float | None) -> dict:
    """opt-1.3b: the planner against hand-written policies a user might try, at the same budgets."""
    cfg, s, n = preset("1.3b"), 128, 32
    hand = {
        "RAM 8x1": ([0, 100, 0, 100, 0, 100], 8, 1), "RAM 32x1": ([0, 100, 0, 100, 0, 100], 32, 1),
        "RAM 64x1": ([0, 100, 0, 100, 0, 100], 64, 1), "w 50% disk 32x4": ([0, 50, 0, 100, 0, 100], 32, 4),
        "w 70% RAM 16x4": ([0, 70, 0, 100, 0, 100], 16, 4), "w 80% RAM 8x8": ([0, 80, 0, 100, 0, 100], 8, 8),
        "w disk 64x4": ([0, 0, 0, 100, 0, 100], 64, 4), "cache disk 32x2": ([0, 100, 0, 0, 0, 100], 32, 2),
        "w 60% cache 50% 32x2": ([0, 60, 0, 50, 0, 100], 32, 2),
        "w 50% cache disk 32x4": ([0, 50, 0, 0, 0, 100], 32, 4), "all disk 64x8": ([0, 0, 0, 0, 0, 0], 64, 8),
        "GPU-ish 100 0 100 0 100 0 16x1": ([100, 0, 100, 0, 100, 0], 16, 1),
    }
    limits = budgets_bytes(hw, gpu_mem, cpu_mem, None)
    rows = []
    for name, (pct, gbs, nb) in hand.items():
        est = estimate(cfg, hw, Policy.from_percents(pct, gpu_batch_size=gbs, num_gpu_batches=nb),
                       prompt_len=s, gen_len=n)
        rows.append({"policy": name, "tokens_per_s": est.tokens_per_s, "fits": est.fits(limits)})
    p = plan(cfg, hw, gpu_mem_gib=gpu_mem, cpu_mem_gib=cpu_mem, prompt_len=s, gen_len=n)
    best = max((r["tokens_per_s"] for r in rows if r["fits"]), default=0.0)
    return {"hardware": hw.host, "cpu_mem_gib": cpu_mem, "gpu_mem_gib": gpu_mem, "hand": rows,
            "planner": {"policy": p.policy.describe(), "tokens_per_s": p.tokens_per_s},
            "planner_over_best_hand": p.tokens_per_s / best if best else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_planner.json"))
    ap.add_argument("--host-profile", type=Path, default=None, help="also plan for this profile file")
    args = ap.parse_args()
    host = HardwareProfile.load(args.host_profile) if args.host_profile else None

    cases = plan_cases(host)
    print(f"{'model':9} {'hardware':20} {'budgets g/c/d':16} {'policy':46} {'tok/s':>8} {'LPs':>4} {'s':>5}")
    for r in cases:
        b = "/".join("-" if v is None else f"{v:g}" for v in r["budgets"])
        print(f"{r['model']:9} {r['hardware']:20} {b:16} {r.get('policy', r.get('error', ''))[:46]:46} "
              f"{r.get('tokens_per_s', 0):8.3f} {r.get('lps', 0):4} {r['seconds']:5.2f}")
    grid = lp_vs_grid()
    gaps = [g["gap"] for g in grid if g["gap"] is not None]
    print(f"\nLP vs grid: {len(gaps)} feasible shapes, max gap {max(gaps):.2e} (grid / LP - 1), "
          f"LP {sum(g['lp_solve_s'] for g in grid) / len(grid) * 1e3:.0f} ms, "
          f"grid {sum(g['grid_solve_s'] for g in grid) / len(grid) * 1e3:.0f} ms per shape")
    sweeps = [sweep_13b(NOTES_HOST, 2.0, None), sweep_13b(NOTES_HOST, 8.0, None), sweep_13b(t4_flexgen(), 8.0, 1.5)]
    for sw in sweeps:
        print(f"\nopt-1.3b on {sw['hardware']}, CPU {sw['cpu_mem_gib']} GiB, GPU {sw['gpu_mem_gib']}: planner "
              f"{sw['planner']['policy']} {sw['planner']['tokens_per_s']:.2f} tok/s = "
              f"{sw['planner_over_best_hand'] or float('nan'):.2f} x the best fitting hand-written policy")
        for r in sw["hand"]:
            print(f"   {r['policy']:34} {r['tokens_per_s']:8.2f} {'' if r['fits'] else '(over budget)'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"plans": cases, "lp_vs_grid": grid, "sweeps_13b": sweeps}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
