"""The suite's parts: each runs one existing benchmark's functions with the suite's settings and
returns a `Part` (rows of one markdown table). Every engine or transformers run is a fresh
subprocess (bench_engine.run_child_rss), one at a time; within a part the systems alternate."""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # the bench_* scripts import each other by their bare names
import bench_chaos  # noqa: E402
import bench_claims  # noqa: E402
import bench_compression_speed  # noqa: E402
import bench_engine  # noqa: E402
import bench_jobrunner  # noqa: E402
import bench_planner_sweep  # noqa: E402

from benchmarks.suite_config import ModelShape, SuiteConfig, ensure_model  # noqa: E402


@dataclass
class Part:
    """One table of the report: `rows` carry at least system, config and tokens_per_s."""
    name: str
    title: str
    rows: list[dict] = field(default_factory=list)
    columns: tuple[tuple[str, str], ...] = ()  # (row key, header) after system/config/tokens/s
    skipped: str | None = None
    error: str | None = None
    seconds: float = 0.0


def _base(cfg: SuiteConfig, model: Path, dtype: str, prompt_len: int | None = None) -> dict:
    return dict(model=str(model), dtype=dtype, prompt_len=prompt_len or cfg.prompt_len, gen_len=cfg.gen_len)


def _rss(row: dict) -> float:
    return (row.get("child_maxrss") or row.get("peak_rss") or 0) / 2**30


def part_ram(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    from engine.model.config import load_config

    rows = bench_engine.run_in_ram(_base(cfg, model, dtype), list(cfg.hf_batches), list(cfg.ram_blocks),
                                   cfg.work_dir / "offload")
    opts = argparse.Namespace(work_dir=cfg.work_dir, dtype=dtype, gen_len=cfg.gen_len, prompt_len=cfg.prompt_len)
    bench_engine.compute_roofline(rows, load_config(model), opts)
    for r in rows:
        r["peak_rss_gib"] = _rss(r)
    return Part("ram", f"All weights in RAM: flexjob vs transformers `generate` (prompt {cfg.prompt_len}, "
                       f"gen {cfg.gen_len}; each after one prefill of the same batch, whose time is the "
                       f"first prefill column; roofline: per step max(weight bytes / RAM bandwidth, linear "
                       f"layers' FLOPs / fastest matmul))", rows,
                (("roofline_fraction", "roofline fraction"), ("prefill_s", "first prefill s"),
                 ("seconds", "seconds"), ("peak_rss_gib", "peak RSS GiB")))


def part_disk(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    from engine.model.config import load_config

    runs = [bench_engine.planned_run(model, cfg.work_dir, cpu_mem=cfg.cpu_mem, prompt_len=cfg.prompt_len,
                                     gen_len=cfg.gen_len, max_block=cfg.disk_max_block),
            *bench_engine.hand_written_runs(cfg.disk_percent, list(cfg.disk_blocks))]
    rows = bench_engine.run_over_capacity(_base(cfg, model, dtype), runs, cfg.work_dir, cpu_mem=cfg.cpu_mem,
                                          hf_batch=cfg.hf_disk_batch)
    opts = argparse.Namespace(work_dir=cfg.work_dir, dtype=dtype, gen_len=cfg.gen_len, prompt_len=cfg.prompt_len)
    bench_engine.roofline(rows, load_config(model), opts)
    for r in rows:
        r["peak_rss_gib"] = _rss(r)
    return Part("disk", f"Over capacity (`--cpu-mem {cfg.cpu_mem:g}`): flexjob (the planner's pick, blocks <= "
                        f"{cfg.disk_max_block} rows, and a hand-written placement) vs transformers + accelerate "
                        f"disk offload (page cache dropped)", rows,
                (("roofline_fraction", "roofline fraction"), ("disk_read_bytes", "disk bytes read"),
                 ("seconds", "seconds"), ("peak_rss_gib", "peak RSS GiB"), ("memory_limit", "memory limit"),
                 ("error", "error")))


def part_llama_ram(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    """The ram part on a Llama-shaped model (cfg.llama_ram) in place of the suite's OPT."""
    return _on_llama("llama-ram", cfg.llama_ram, part_ram(cfg, ensure_model(cfg, cfg.llama_ram), dtype))


def part_llama_disk(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    """The disk part on an 8B-shaped Llama (cfg.llama_disk) under cfg.llama_disk_cpu_mem."""
    over = replace(cfg, cpu_mem=cfg.llama_disk_cpu_mem)
    return _on_llama("llama-disk", cfg.llama_disk, part_disk(over, ensure_model(cfg, cfg.llama_disk), dtype))


def _on_llama(name: str, shape: ModelShape, part: Part) -> Part:
    return replace(part, name=name, title=f"{shape.name} (random weights): {part.title}")


def part_planner(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    opts = argparse.Namespace(model=model, work_dir=cfg.work_dir, cpu_mem=cfg.planner_cpu_mem,
                              prompt_len=cfg.prompt_len, gen_len=cfg.gen_len, repeats=cfg.planner_repeats, refresh_profile=False,
                              only=",".join((*cfg.planner_policies, "planner")), max_block=cfg.planner_max_block,
                              compression=False)
    swept, _, _ = bench_planner_sweep.sweep(opts)
    rows = [{"system": "planner" if r["policy"] == "planner" else "hand-written",
             "config": f"{r['policy']}: {r['describe']}", "tokens_per_s": r["measured_tokens_per_s"],
             **{k: v for k, v in r.items() if k not in ("policy_dict", "all_runs")}} for r in swept]
    return Part("planner", f"Planner's pick vs hand-written policies (`--cpu-mem {cfg.planner_cpu_mem:g}`, "
                           f"blocks <= {cfg.planner_max_block}, median of {cfg.planner_repeats} "
                           f"run{'s' if cfg.planner_repeats > 1 else ''} each)", rows,
                (("predicted_tokens_per_s", "predicted tokens/s"), ("ratio", "predicted / measured"),
                 ("prefill_s", "prefill s"), ("predicted_prefill_s", "predicted"),
                 ("decode_step_s", "decode step s"), ("predicted_decode_step_s", "predicted"),
                 ("peak_rss_gib", "peak RSS GiB"), ("error", "error")))


def part_compression(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    gbs, nb = cfg.compression_block
    rows = bench_compression_speed.run_pair(model, cfg.work_dir / "offload", prompt_len=cfg.prompt_len,
                                            gen_len=cfg.gen_len, gbs=gbs, nb=nb, cpu_mem=cfg.cpu_mem)
    for r in rows:
        r["system"] = "flexjob"
        r["config"] = f"{gbs}x{nb}, weights on disk, {'4-bit' if r['compress_weight'] else '16-bit'}"
        r["peak_rss_gib"] = _rss(r)
        r["dequantize_s_per_step"] = r.get("dequantize_s", 0) / max(1, r.get("steps", 1))
    return Part("compression", f"4-bit weight compression on/off, weights read from disk each step "
                               f"(`--cpu-mem {cfg.cpu_mem:g}`)", rows,
                (("disk_read_bytes", "disk bytes read"), ("dequantize_s_per_step", "dequantise s/step"),
                 ("peak_rss_gib", "peak RSS GiB")))


def part_jobrunner(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    work = cfg.work_dir / f"jobrunner-{cfg.jobrunner_size}-{cfg.jobrunner_layers}l"
    work.mkdir(parents=True, exist_ok=True)
    path = bench_jobrunner.bench_path(work, size=cfg.jobrunner_size, layers=cfg.jobrunner_layers,
                                      rows=cfg.jobrunner_rows, max_new_tokens=cfg.jobrunner_new_tokens,
                                      block=16 if cfg.jobrunner_rows >= 16 else cfg.jobrunner_rows, dtype=dtype,
                                      repeats=1)
    commit = bench_jobrunner.bench_commit(work, blocks=cfg.commit_blocks)
    shape = f"opt-{path['model']}, {path['rows']} rows x {path['max_new_tokens']} tokens, block {path['block']}"
    rows = [{"system": "engine alone", "config": shape, "tokens_per_s": path["engine_tokens_per_s"],
             "seconds": path["engine_s"]},
            {"system": "enqueue + work + results (SQLite)", "config": shape,
             "tokens_per_s": path["path_tokens_per_s"], "seconds": path["path_s"], "ratio": path["ratio"],
             "commit_ms_p50": commit["commit_ms_p50"], "commit_ms_p95": commit["commit_ms_p95"],
             "part_write_ms_p50": commit["part_write_ms_p50"]}]
    return Part("jobrunner", "Job-runner overhead: the whole path vs the engine alone; per-block commit latency",
                rows, (("seconds", "seconds"), ("ratio", "path / engine"), ("commit_ms_p50", "commit ms p50"),
                       ("commit_ms_p95", "commit ms p95"), ("part_write_ms_p50", "part encode ms p50")))


def part_claims(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    """Claim throughput of 8 claimer processes on SQLite and PostgreSQL (bench_claims)."""
    result = bench_claims.bench(shards=cfg.claims_shards, claimers=8, repeats=1, backends=bench_claims.BACKENDS,
                                work=cfg.work_dir / "claims")
    rows = [{"system": f"claims, {r['backend']}", "config": f"{r['claimers']} claimers, {r['shards']} shards", **r}
            for r in result["rows"]]
    skipped = "".join(f"; {b} skipped: {why}" for b, why in result["skipped"].items())
    return Part("claims", f"Claims (each with its commit) per second, single-row shards{skipped}", rows,
                (("claims_per_s", "claims/s"), ("claim_ms_p50", "p50 ms"), ("claim_ms_p95", "p95 ms"),
                 ("double_claims", "double claims"), ("retries", "store errors retried"), ("ok", "ok")))


def part_chaos(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    """Random kills and stalls on simulated machines (bench_chaos; --quick: its quick size)."""
    chaos = bench_chaos.ChaosConfig()
    result = bench_chaos.bench(chaos.quick() if cfg.chaos_quick else chaos, cfg.work_dir / "chaos")
    rows = [{"system": f"chaos {p['phase']}, {p['backend']}",
             "config": f"{sum(n for _, n in p['machines'])} workers on {len(p['machines'])} machine(s)", **p}
            for p in result["phases"]]
    skipped = "".join(f"; {ph} skipped: {why}" for ph, why in result["skipped"].items())
    return Part("chaos", f"Chaos: 2 jobs x {result['rows_per_job']} rows, clean run {result['clean_seconds']:.0f} s"
                         f"{skipped}", rows,
                (("kills", "kills"), ("holder_kills", "of holders"), ("stalls", "stalls"),
                 ("takeovers_dead", "taken over (dead)"), ("takeovers_expired", "taken over (expired)"),
                 ("fenced_writes", "writes fenced"), ("fenced_commits", "commits fenced"),
                 ("redone_steps_at_most", "redone steps <="), ("wall_vs_clean", "wall x clean"), ("ok", "ok")))


FLEXGEN_THROUGHPUT = re.compile(r"total throughput:\s*([0-9.]+)\s*token/s")


def flexgen_unavailable() -> str | None:
    """Why FlexLLMGen cannot run side by side here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (FlexLLMGen computes on a GPU only)"
    if importlib.util.find_spec("flexgen") is None:
        return "the `flexgen` package is not installed (pip install flexgen)"
    return None


def part_flexgen(cfg: SuiteConfig, model: Path, dtype: str) -> Part:
    title = (f"flexjob vs FlexLLMGen on the GPU (same policy `{cfg.gpu_percent}` {cfg.gpu_block[0]}x"
             f"{cfg.gpu_block[1]}, prompt {cfg.gpu_prompt_len}, gen {cfg.gen_len}, FlexLLMGen's dummy weights)")
    why = flexgen_unavailable()
    if why:
        return Part("flexgen", title, skipped=why)
    gbs, nb = cfg.gpu_block
    percent = [int(float(x)) for x in cfg.gpu_percent.split()]
    flexgen = _run_flexgen(cfg, percent, gbs, nb)
    ours = bench_engine.run_child_rss(bench_engine.ENGINE_RUN, {
        **_base(cfg, model, "float16", cfg.gpu_prompt_len), "percent": percent, "gbs": gbs, "nb": nb,
        "offload": str(cfg.work_dir / "offload"), "cpu_mem": None})
    config = f"{gbs}x{nb} {cfg.gpu_percent}"
    rows = [{"system": "FlexLLMGen", "config": config, **flexgen},
            {"system": "flexjob", "config": config, **ours}]
    return Part("flexgen", title, rows, (("seconds", "seconds"), ("error", "error")))


def _run_flexgen(cfg: SuiteConfig, percent: list[int], gbs: int, nb: int) -> dict:
    """FlexLLMGen's own benchmark entry point on its dummy weights; its log line gives tokens/s."""
    log = cfg.work_dir / "flexgen.log"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", f"facebook/opt-{cfg.model_size}", "--path",
           "_DUMMY_", "--offload-dir", str(cfg.work_dir / "flexgen-offload"), "--percent", *map(str, percent),
           "--gpu-batch-size", str(gbs), "--num-gpu-batches", str(nb), "--prompt-len", str(cfg.gpu_prompt_len),
           "--gen-len", str(cfg.gen_len), "--log-file", str(log)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    found = FLEXGEN_THROUGHPUT.search(log.read_text() if log.is_file() else done.stdout)
    if done.returncode != 0 or not found:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"error": f"FlexLLMGen failed: {tail}", "seconds": seconds}
    return {"tokens_per_s": float(found.group(1)), "seconds": seconds}


PARTS: dict[str, Callable[[SuiteConfig, Path, str], Part]] = {
    "ram": part_ram, "disk": part_disk, "llama-ram": part_llama_ram, "llama-disk": part_llama_disk,
    "planner": part_planner, "compression": part_compression, "jobrunner": part_jobrunner, "flexgen": part_flexgen,
    "claims": part_claims, "chaos": part_chaos}
# Parts that compute on the CPU (in --suite gpu they run in a child that cannot see the GPU).
CPU_PARTS = ("ram", "disk", "llama-ram", "llama-disk", "planner", "compression", "jobrunner")
# Reliability parts (the job store under load and faults): run only when --parts names them; chaos
# needs root (namespaces); its full size takes well over 10 minutes on a busy 2-core host.
RELIABILITY_PARTS = ("claims", "chaos")
# llama-disk takes hours on a 2-core host: --suite cpu runs it only when --parts names it.
CPU_DEFAULT_PARTS = tuple(p for p in CPU_PARTS if p != "llama-disk")
GPU_PARTS = (*CPU_PARTS, "flexgen")
