"""One benchmark suite: `python -m benchmarks --suite cpu|gpu [--quick] [--parts a,b] [--out DIR]`.

Parts (each reuses one bench_*.py script's functions; every run is a fresh subprocess, one at a time,
systems alternated within a part so a shared host's noise hits both sides):
  ram          flexjob vs transformers `generate`, all weights in RAM      (bench_engine, part a)
  disk         flexjob under --cpu-mem (the planner's pick, blocks <= 64 rows; --quick: also the
               hand-written `0 10 0 0 100 0`) vs transformers + accelerate disk offload,
               with the fraction of the roofline reached                    (bench_engine, part b)
  llama-ram    the ram part on a Llama-shaped 1B (llama-1b: GQA, RoPE, SwiGLU; HF's LlamaForCausalLM)
  llama-disk   the disk part on a Llama-shaped 8B (llama-8b, 16 GB of fp16 weights) under --cpu-mem 8;
               opt-in for --suite cpu (name it in --parts), in --suite gpu's default list
  planner      the planner's pick vs hand-written policies, measured and predicted (bench_planner_sweep)
  compression  4-bit weights on/off with the weights read from disk         (bench_compression_speed)
  jobrunner    enqueue + work + results vs the engine alone; commit latency (bench_jobrunner)
  claims       (opt-in) claims/s of 8 concurrent claimer processes, SQLite and PostgreSQL (bench_claims)
  chaos        (opt-in, root) random kills and stalls of workers on simulated machines; every row once,
               output equal to a clean run (bench_chaos; --quick: its quick size)
  flexgen      (--suite gpu) FlexLLMGen side by side on the same policy, prompt 512, gen 32; skipped
               with the reason when there is no CUDA device or no `flexgen` package
`--suite cpu` hides any GPU from itself and its children; `--suite gpu` runs the CPU parts that way in
a child `--suite cpu` and FlexLLMGen's part on the GPU, and reports them together.
Writes suite-<date>.md (a table per part, CPU flags, dtype, command line), suite-<date>.json and
suite-<date>-{tokens,roofline,planner}.png under --out (default benchmarks/results/).

Models are random-weight OPT and Llama-family models of the real dimensions (engine.model.synthetic),
made once under --work-dir. Measured time of the default CPU suite (opt-1.3b, prompt 128, gen 32) on a
quiet 2-core AMD Zen4 with AVX512-BF16 (bfloat16): 20 minutes in all (ram 3.5 min for 4 runs, disk
3-5 min: flexjob, accelerate under the memory limit and without it, llama-ram 3.5 min, planner 7 min
for 9 runs (11 runs, each after a warm-up prefill, in the current list: ~10 min), compression 2 min, jobrunner under 1 min, plus making the models and the host profile).
(measured with a fixed 32-row block in the disk part; the planner's 64-row pick adds a few minutes). An AVX2-only host computes in float32, 2-3x slower (docs/BENCHMARKS.md, 2-core Zen3:
the ram part 11.4 minutes, the disk part 18 with the pick and the 16x2 block): the full suite is
well over 30 minutes there.
llama-disk is left out of --suite cpu's default because it alone takes longer than the whole suite: on
that 2-core host, with the rates above scaled by parameter count (8.0B vs 1.3B, ~6x), making the model
and converting its weight store (16 GB each) ~15 min, flexjob's 16x2 block ~13 min (1,024 tokens at
~1.3 tokens/s), then accelerate's run: well over 30 minutes, hours in float32; it needs ~40 GB free
under --work-dir (more in float32, where accelerate offloads float32 weights).
`--quick` (opt-125m with 2 layers, Llama models with 2 layers and hidden 256, gen 4, one block or
policy each) takes ~3 minutes the first time on a busy 2-core host (it makes its models and measures
the host's profile), ~1 minute after.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from datetime import date
from pathlib import Path

from benchmarks.suite_config import SuiteConfig, ensure_model, host_facts
from benchmarks.suite_parts import (CPU_DEFAULT_PARTS, CPU_PARTS, GPU_PARTS, PARTS, RELIABILITY_PARTS, Part,
                                    flexgen_unavailable)
from benchmarks.suite_report import parts_from_json, write_json, write_markdown, write_plots


def parse_args(argv: list[str] | None = None) -> tuple[SuiteConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="shrink everything: a smoke run of every part")
    ap.add_argument("--parts", default="", help=f"comma list of parts to run, from {', '.join(GPU_PARTS)}, "
                                                f"{', '.join(RELIABILITY_PARTS)} "
                                                f"(default: all of --suite gpu's; --suite cpu's leave out "
                                                f"llama-disk, which takes well over 30 minutes on 2 cores)")
    ap.add_argument("--model-size", default=None, help="OPT size of the generated model (default 1.3b; 125m "
                                                       "with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the published depth")
    ap.add_argument("--work-dir", type=Path, default=SuiteConfig.work_dir,
                    help="models, weight stores and offload files, kept between runs")
    ap.add_argument("--out", type=Path, default=SuiteConfig.out_dir, help="where the report files go")
    ap.add_argument("--planner-repeats", type=int, default=SuiteConfig.planner_repeats,
                    help="rounds of the planner part; the median run of each policy counts (3 on a shared host)")
    opts = ap.parse_args(argv)
    cfg = SuiteConfig(suite=opts.suite, work_dir=opts.work_dir, out_dir=opts.out)
    cfg = cfg.quick() if opts.quick else cfg
    if opts.model_size:
        cfg = replace(cfg, model_size=opts.model_size)
    if opts.layers:
        cfg = replace(cfg, num_layers=opts.layers)
    cfg = replace(cfg, planner_repeats=max(1, opts.planner_repeats))
    known = GPU_PARTS if opts.suite == "gpu" else CPU_DEFAULT_PARTS
    chosen = tuple(p for p in opts.parts.split(",") if p) or known
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}; parts: {', '.join((*GPU_PARTS, *RELIABILITY_PARTS))}")
    return replace(cfg, parts=chosen), opts


def run_part(name: str, cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    """One part, timed; a part that raises becomes a report line, and the suite goes on."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    try:
        part = PARTS[name](cfg, model, dtype)
    except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' results
        traceback.print_exc()
        part = Part(name, name, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    part.seconds = time.perf_counter() - started
    if part.skipped:
        print(f"   {name} skipped: {part.skipped}", flush=True)
    return part


def main(argv: list[str] | None = None) -> int:
    cfg, opts = parse_args(argv)
    if cfg.suite == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU suite measures the CPU, even on a GPU host
    from engine.runtime.devices import default_dtype_name

    if cfg.suite == "gpu" and (why := flexgen_unavailable()):
        print(f"--suite gpu: FlexLLMGen is skipped: {why}", flush=True)
    started = time.perf_counter()
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    model = ensure_model(cfg)
    dtype = default_dtype_name()
    cpu_side = [n for n in cfg.parts if n in CPU_PARTS] if cfg.suite == "gpu" else []
    parts = run_cpu_suite_in_child(cfg, cpu_side, quick=opts.quick) if cpu_side else []
    parts += [run_part(name, cfg, model, dtype) for name in cfg.parts if name not in cpu_side]
    meta = {"suite": cfg.suite, "date": date.today().isoformat(), "dtype": dtype, "model": cfg.model_name,
            "command": shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]),
            "host": host_facts(), "seconds": time.perf_counter() - started,
            "settings": {k: str(v) for k, v in vars(cfg).items()}}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem = cfg.out_dir / f"suite-{meta['date']}"
    write_markdown(stem.with_suffix(".md"), parts, meta)
    write_json(stem.with_suffix(".json"), parts, meta)
    plots = write_plots(stem, parts)
    print(f"wrote {stem.with_suffix('.md')}, {stem.with_suffix('.json')}, {', '.join(p.name for p in plots)}")
    failed = [p.name for p in parts if p.error]
    if failed:
        print(f"parts that failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    return 1 if failed else 0


def run_cpu_suite_in_child(cfg: SuiteConfig, names: list[str], *, quick: bool) -> list[Part]:
    """The GPU suite's CPU parts, run as `--suite cpu` in a child that cannot see the GPU (an engine
    or profile in this process would use it); their parts come back through the child's JSON."""
    out = cfg.work_dir / "cpu-parts"
    cmd = [sys.executable, "-m", "benchmarks", "--suite", "cpu", "--parts", ",".join(names), "--out", str(out),
           "--work-dir", str(cfg.work_dir), "--model-size", cfg.model_size, *(["--quick"] if quick else []),
           *(["--layers", str(cfg.num_layers)] if cfg.num_layers else [])]
    report = out / f"suite-{date.today().isoformat()}.json"
    report.unlink(missing_ok=True)
    print(f"== CPU parts without the GPU: {shlex.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, cwd=Path(__file__).parent.parent)
    if not report.is_file():
        return [Part(name, name, error=f"the CPU suite's child exited {done.returncode} without a report")
                for name in names]
    return parts_from_json(json.loads(report.read_text()))

if __name__ == "__main__":
    sys.exit(main())
