"""Calibration: the cost model's predicted tokens/s against the engine's measured tokens/s.

Runs a generated OPT (125m dims, 4 layers by default) under several policies on this host, with
the host's measured profile (`engine.planning.profiler`), and reports predicted / measured per policy.
The disk tier bypasses the page cache, as the profile's disk read does.

    python benchmarks/bench_planner_calibration.py [--layers 4] [--rows-blocks 2] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil

from engine.planning.cost_model import estimate
from engine.runtime.engine import Engine
from engine.model.config import preset
from engine.model.synthetic import make_model
from engine.runtime.policy import Policy
from engine.planning.profiler import load_or_measure_profile
from engine.runtime.rows import GenerationParams, RowInput

POLICIES = {
    "all RAM 8x1": Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=8),
    "all RAM 32x1": Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=32),
    "weights 50% disk 8x2": Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=8, num_gpu_batches=2),
    "weights on disk 16x1": Policy.from_percents([0, 0, 0, 100, 0, 100], gpu_batch_size=16),
    "cache on disk 8x2": Policy.from_percents([0, 100, 0, 0, 0, 100], gpu_batch_size=8, num_gpu_batches=2),
    "no overlap, weights 50% disk 16x1": Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=16,
                                                              overlap=False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=1, help="blocks per measured run")
    ap.add_argument("--repeats", type=int, default=2, help="measured runs per policy (the best counts)")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/planner_calibration.json"))
    args = ap.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="flexjob-calib-"))
    model_dir, offload = work / "model", work / "offload"
    cfg = preset("125m", num_layers=args.layers)
    if not (model_dir / "config.json").exists():
        make_model(cfg, model_dir, with_tokenizer=False)  # rows are token ids already
    hw = load_or_measure_profile(offload, refresh=True)  # measured now, under today's load
    params = GenerationParams(max_new_tokens=args.gen_len)
    rows_out = []
    for name, policy in POLICIES.items():
        n = policy.block_size * args.blocks
        rows = [RowInput(row_id=i, prompt_ids=tuple(2 + (i * 7 + j) % 50000 for j in range(args.prompt_len)))
                for i in range(n)]
        baseline_rss = psutil.Process().memory_info().rss
        engine = Engine(model_dir, policy, offload_dir=offload)
        try:
            engine.generate(rows[:policy.block_size], params)  # warm-up: conversion, allocator, threads
            best = None
            for _ in range(args.repeats):  # the best run: a busy shared host only ever slows a run down
                start = len(engine.stats.blocks)
                t0 = time.perf_counter()
                engine.generate(rows, params)
                wall = time.perf_counter() - t0
                blocks = engine.stats.blocks[start:]
                tps = sum(b.generated_tokens for b in blocks) / sum(b.total_s for b in blocks)
                if best is None or tps > best[0]:
                    best = (tps, wall, blocks)
            measured, wall, blocks = best
            prefill = sum(b.prefill_s for b in blocks) / len(blocks)
            step = sum(b.total_s - b.prefill_s for b in blocks) / len(blocks) / max(args.gen_len - 1, 1)
            peak_rss = engine.stats.peak_rss_bytes
        finally:
            engine.close()
        pred = estimate(cfg, hw, policy, prompt_len=args.prompt_len, gen_len=args.gen_len)
        rows_out.append({"policy": name, "describe": policy.describe(), "predicted_tokens_per_s": pred.tokens_per_s,
                         "measured_tokens_per_s": measured, "ratio": pred.tokens_per_s / measured,
                         "wall_s": wall, "predicted_bottleneck": pred.bottleneck,
                         "prefill_s": {"predicted": pred.prefill_s, "measured": prefill},
                         "decode_step_s": {"predicted": pred.decode_step_s, "measured": step},
                         "cpu_peak_gib": {"predicted_engine_tensors": pred.peak_gib["cpu"],
                                          "process_before_engine": baseline_rss / 2 ** 30,
                                          "measured_rss": peak_rss / 2 ** 30}})
        print(f"{name:36} predicted {pred.tokens_per_s:8.2f}  measured {measured:8.2f}  "
              f"ratio {pred.tokens_per_s / measured:5.2f}  ({pred.bottleneck}; prefill {pred.prefill_s:.3f} vs "
              f"{prefill:.3f} s, decode step {pred.decode_step_s:.4f} vs {step:.4f} s; CPU tensors "
              f"{pred.peak_gib['cpu']:.2f} GiB + process {baseline_rss / 2**30:.2f}, RSS peak {peak_rss / 2**30:.2f})",
              flush=True)
    within = sum(0.7 <= r["ratio"] <= 1.3 for r in rows_out)
    print(f"{within}/{len(rows_out)} policies within +-30 % (model {cfg.name} x {args.layers} layers, "
          f"prompt {args.prompt_len}, gen {args.gen_len}, profile {hw.source}, disk read {hw.disk_read_method})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"profile": hw.to_dict(), "results": rows_out}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
