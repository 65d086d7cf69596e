"""Engine throughput vs Hugging Face, side by side in one run.

    python benchmarks/bench_engine.py --model /work/models/opt-1.3b            # full
    python benchmarks/bench_engine.py --model DIR --gen-len 8 --quick          # smoke

(a) All weights in RAM: this engine at several block shapes vs transformers `generate` at batch 8,
    16, 32. Metric: generated tokens/s over the whole run, prefill included (FlexGen's metric). Each
    side first runs one prefill of the same batch (one new token), not counted: a process's first
    calls pay one-off costs (kernel choices, fresh pages). `prefill_s` is that first prefill. Each
    run's fraction of the compute roofline (`compute_roofline`).
(b) Weights on disk under --cpu-mem: this engine (page cache bypassed: O_DIRECT reads) vs
    transformers + accelerate disk offload (`device_map` with `max_memory`), whose measured peak RSS
    must fit the same budget. Also the fraction of the roofline reached: per step
    max(bytes read from disk / measured uncached read bandwidth, FLOPs / measured FLOP/s), summed
    over the steps (`roofline`).
Every run is a fresh subprocess (honest peak RSS via wait4); runs alternate so machine noise hits
both sides alike. Page cache is dropped for the model files between disk runs (fadvise).
Results: benchmarks/results/engine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or imported by the suite
import memory_cgroup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

ENGINE_RUN = r"""
import json, sys, time
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput
args = json.loads(sys.argv[1])
policy = Policy.from_percents(args["percent"], gpu_batch_size=args["gbs"], num_gpu_batches=args["nb"],
                              compress_weight=args.get("compress_weight", False),
                              compress_cache=args.get("compress_cache", False))
engine = Engine(args["model"], policy, dtype=args["dtype"], offload_dir=args["offload"], cpu_mem_gib=args["cpu_mem"])
rows = [RowInput(row_id=i, prompt_ids=tuple(100 + (i * 7 + j) % 5000 for j in range(args["prompt_len"])))
        for i in range(policy.block_size)]
stop = (-1,)  # never stop early: every row generates gen_len tokens, as in FlexGen's benchmark
first_prefill_s = None
if args.get("warm_up"):  # HF_RUN's protocol: one prefill of the same rows first, timed on its own
    engine.generate(rows, GenerationParams(max_new_tokens=1, stop_token_ids=stop))
    first_prefill_s = engine.stats.blocks[0].prefill_s
    engine.stats.blocks.clear()
started = time.perf_counter()
engine.generate(rows, GenerationParams(max_new_tokens=args["gen_len"], stop_token_ids=stop))
elapsed = time.perf_counter() - started
b = engine.stats.blocks[0]
print(json.dumps({"tokens_per_s": engine.stats.generated_tokens / elapsed, "seconds": elapsed,
                  "prefill_s": first_prefill_s if first_prefill_s is not None else b.prefill_s,
                  "timed_prefill_s": b.prefill_s, "disk_read_bytes": b.transfers.get("disk_read", (0, 0))[0],
                  "disk_read_s": b.transfers.get("disk_read", (0, 0))[1], "peak_rss": engine.stats.peak_rss_bytes,
                  "dequantize_s": b.transfers.get("dequantize", (0, 0))[1], "steps": args["gen_len"],
                  "weights_disk_bytes": engine.weights.disk_bytes_per_step()}))
"""

STORE_RUN = r"""
import json, sys
from pathlib import Path
from engine.model.checkpoint import WeightStore
from engine.model.config import load_config
args = json.loads(sys.argv[1])
WeightStore.open_or_convert(Path(args["model"]), load_config(Path(args["model"])), Path(args["offload"]))
print(json.dumps({}))
"""

HF_RUN = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
from transformers import AutoModelForCausalLM  # HF's own class for the model's architectures
dtype = getattr(torch, args["dtype"])
kwargs = {}
if args.get("offload"):
    kwargs = dict(device_map="auto", max_memory={"cpu": f"{args['cpu_mem']}GiB"}, offload_folder=args["offload"])
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=dtype, **kwargs).eval()
B = args["batch"]
ids = torch.tensor([[100 + (i * 7 + j) % 5000 for j in range(args["prompt_len"])] for i in range(B)])
prefill_s = None
with torch.no_grad():
    if args.get("time_prefill"):  # generate's prefill alone: one new token
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False, pad_token_id=1)
        prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args["gen_len"],
                         min_new_tokens=args["gen_len"], do_sample=False, pad_token_id=1)
    elapsed = time.perf_counter() - started
import resource
print(json.dumps({"tokens_per_s": B * args["gen_len"] / elapsed, "seconds": elapsed, "prefill_s": prefill_s,
                  "self_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


# Appended to every child's code: its own peak RSS since exec (VmHWM). wait4's ru_maxrss is not
# that: Linux carries the forking parent's high-water mark across exec, so a child of a suite that
# had just made a 3 GB model reported 2.9 GiB where its own peak was 1.5.
_REPORT_PEAK = """
import json as _json, os as _os
_status = "/proc/self/status"
print(_json.dumps({"vm_hwm": next((int(line.split()[1]) * 1024 for line in open(_status)
                                   if line.startswith("VmHWM:")), None) if _os.path.exists(_status) else None}))
"""


def run_child(code: str, args: dict, source: Path = ROOT, preexec_fn=None) -> dict:
    """Run `code` in a fresh Python importing flexjob from `source`; returns its JSON line plus the
    child's own peak RSS (`vm_hwm`). `preexec_fn` runs in the child before Python starts (a memory
    cgroup)."""
    proc = subprocess.Popen([sys.executable, "-c", code + _REPORT_PEAK, json.dumps(args)], cwd=source,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(source)},
                            preexec_fn=preexec_fn)
    out, err = proc.communicate()
    _, status, usage = os.wait4(proc.pid, 0) if proc.returncode is None else (0, proc.returncode, None)
    if proc.returncode != 0:
        if proc.returncode == -9:
            return {"error": "killed (SIGKILL: out of memory under its limit)"}
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    *_, line, peak = out.strip().splitlines()
    result = {**json.loads(line), **json.loads(peak)}
    result.setdefault("peak_rss", 0)
    return result


def run_child_rss(code: str, args: dict, preexec_fn=None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = run_child(code, args, preexec_fn=preexec_fn)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # The child's own high-water mark where the OS tells it; else ru_maxrss of children, the max
    # over all children (and carried across exec: see _REPORT_PEAK), trusted only when it grew.
    result["child_maxrss"] = result.get("vm_hwm") or (after * 1024 if after > before else result.get("self_maxrss"))
    return result


def run_limited(code: str, args: dict, limit_gib: float | None) -> dict:
    """`run_child_rss` inside a memory cgroup of `limit_gib` (process and page cache together), when
    given and possible here; the row says which limit held, or why none could."""
    if limit_gib is None:
        return {**run_child_rss(code, args), "memory_limit": "none"}
    why_not = memory_cgroup.available()
    if why_not:
        return {**run_child_rss(code, args), "memory_limit": f"none ({why_not})"}
    with memory_cgroup.memory_limit(limit_gib, f"flexjob-bench-{os.getpid()}") as (enter, stats):
        result = run_child_rss(code, args, preexec_fn=enter)
        result.update(stats())
    return {**result, "memory_limit": f"{limit_gib:g} GiB"}


def drop_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    from engine.runtime.devices import default_dtype_name
    from engine.model.config import load_config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/flexjob-bench-engine"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--dtype", default=default_dtype_name())
    ap.add_argument("--cpu-mem", type=float, default=2.0, help="Budget for (b), GiB.")
    ap.add_argument("--hf-batches", default="8,16,32")
    ap.add_argument("--blocks", default="32x1,32x2,64x2", help="Engine block shapes for (a): GBSxN.")
    ap.add_argument("--disk-planned", type=int, default=64, metavar="MAX_BLOCK",
                    help="(b) also runs the planner's pick with blocks up to this many rows (0: not)")
    ap.add_argument("--disk-blocks", default="16x2", help="Engine block shapes for (b)'s hand-written placement "
                                                         "('' for none).")
    ap.add_argument("--disk-percent", default="0 10 0 0 100 0", help="Engine placement for (b).")
    ap.add_argument("--hf-disk-batch", type=int, default=8)
    ap.add_argument("--skip", default="", help="Comma list of parts to skip: a,b")
    opts = ap.parse_args()
    cfg = load_config(opts.model)
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    offload = opts.work_dir / "offload"
    base = dict(model=str(opts.model), dtype=opts.dtype, prompt_len=opts.prompt_len, gen_len=opts.gen_len)
    rows = []

    if "a" not in opts.skip:
        rows += run_in_ram(base, [int(b) for b in opts.hf_batches.split(",")], parse_blocks(opts.blocks), offload)
        compute_roofline(rows, cfg, opts)
    if "b" not in opts.skip:
        runs = hand_written_runs(opts.disk_percent, parse_blocks(opts.disk_blocks) if opts.disk_blocks else [])
        if opts.disk_planned:
            runs.insert(0, planned_run(opts.model, opts.work_dir, cpu_mem=opts.cpu_mem, prompt_len=opts.prompt_len,
                                       gen_len=opts.gen_len, max_block=opts.disk_planned))
        rows += run_over_capacity(base, runs, opts.work_dir, cpu_mem=opts.cpu_mem, hf_batch=opts.hf_disk_batch)
        roofline(rows, cfg, opts)

    summarise(rows, opts)


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """"32x1,32x2" -> [(32, 1), (32, 2)]: engine block shapes as gpu_batch_size x num_gpu_batches."""
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


def run_in_ram(base: dict, hf_batches: list[int], blocks: list[tuple[int, int]], offload: Path) -> list[dict]:
    """Part (a): transformers `generate` at each batch and the engine at each block shape, all weights in
    RAM, alternated (transformers, engine, transformers, ...) so machine noise hits both alike."""
    hf = [("hf", b) for b in hf_batches]
    ours = [("engine", shape) for shape in blocks]
    rows = []
    for kind, shape in [x for pair in zip(hf, ours) for x in pair] + hf[len(ours):] + ours[len(hf):]:
        if kind == "hf":
            r = run_child_rss(HF_RUN, {**base, "batch": shape, "time_prefill": True})
            rows.append({"part": "a", "system": "transformers", "config": f"batch {shape}", **r})
        else:
            r = run_child_rss(ENGINE_RUN, {**base, "percent": [100, 0, 100, 0, 100, 0], "gbs": shape[0],
                                           "nb": shape[1], "offload": str(offload), "cpu_mem": None,
                                           "warm_up": True})
            rows.append({"part": "a", "system": "flexjob", "config": f"{shape[0]}x{shape[1]} all RAM", **r})
        print(rows[-1], flush=True)
    return rows


@dataclass(frozen=True)
class DiskRun:
    """One engine run of part (b): FlexGen's six percents and a block shape; `label` says where they
    came from (the planner's pick or a hand-written placement)."""
    percent: tuple[float, ...]
    gbs: int
    nb: int
    label: str = ""

    @property
    def config(self) -> str:
        pct = " ".join(f"{p:g}" for p in self.percent)
        return f"{self.gbs}x{self.nb} {pct}" + (f" ({self.label})" if self.label else "")


def hand_written_runs(disk_percent: str, blocks: list[tuple[int, int]]) -> list[DiskRun]:
    percent = tuple(float(x) for x in disk_percent.split())
    return [DiskRun(percent, gbs, nb) for gbs, nb in blocks]


def plan_for_worker(model: Path, offload: Path, *, cpu_mem: float, prompt_len: int, gen_len: int,
                    max_block: int | None, compression: bool = False, refresh_profile: bool = False):
    """The planner's pick for `model` under `cpu_mem` GiB, as `flexjob plan` makes it: for the fresh
    worker process a policy runs in, not for this one, which holds the profile's and the calibration's
    leftovers. -> (model config, hardware profile, the planner's Plan)."""
    from engine.model.config import load_config
    from engine.planning.planner import plan
    from engine.planning.profiler import load_or_measure_profile
    from jobrunner.worker.replan import worker_reserved_gib

    cfg = load_config(model)
    offload.mkdir(parents=True, exist_ok=True)
    hw = load_or_measure_profile(offload, refresh=refresh_profile, model=cfg)
    planned = plan(cfg, hw, gpu_mem_gib=None, cpu_mem_gib=cpu_mem, gen_len=gen_len, prompt_len=prompt_len,
                   max_block_size=max_block, compress_options=(False, True) if compression else (False,),
                   cpu_reserved_gib=worker_reserved_gib())
    return cfg, hw, planned


def planned_run(model: Path, work_dir: Path, *, cpu_mem: float, prompt_len: int, gen_len: int,
                max_block: int) -> DiskRun:
    """The planner's pick under `cpu_mem` (uncompressed, blocks <= max_block rows), as `flexjob work
    --cpu-mem` would run it."""
    _, _, planned = plan_for_worker(model, work_dir / "offload", cpu_mem=cpu_mem, prompt_len=prompt_len,
                                    gen_len=gen_len, max_block=max_block)
    p = planned.policy
    return DiskRun(tuple(p.percents), p.gpu_batch_size, p.num_gpu_batches,
                   f"planner's pick, predicted {planned.tokens_per_s:.2f} tokens/s")


def run_over_capacity(base: dict, runs: list[DiskRun], work_dir: Path, *, cpu_mem: float,
                      hf_batch: int) -> list[dict]:
    """Part (b): the engine under `cpu_mem` GiB, once per run in `runs` (page cache dropped before each),
    and transformers + accelerate disk offload. Where a memory cgroup is possible (root), every run
    is held to `cpu_mem` GiB of process and page cache together, as on a machine with that much RAM:
    accelerate's `max_memory` (half the limit, leaving it room for activations; a quarter where half is
    killed) places weights but limits nothing, and without the cgroup its offload folder is read back from the page cache.
    accelerate also runs once without a limit, with `max_memory` = `cpu_mem`, for comparison."""
    offload = work_dir / "offload"
    # The weight store is made first, in a child of its own: converting the checkpoint maps it whole,
    # and that child's peak is not the measured run's.
    run_child(STORE_RUN, {"model": base["model"], "offload": str(offload)})
    rows = []
    for run in runs:
        drop_page_cache(offload)
        r = run_limited(ENGINE_RUN, {**base, "percent": list(run.percent), "gbs": run.gbs, "nb": run.nb,
                                     "offload": str(offload), "cpu_mem": cpu_mem}, cpu_mem)
        rows.append({"part": "b", "system": "flexjob", "config": run.config, "block_rows": run.gbs * run.nb, **r})
        print(rows[-1], flush=True)

    def accelerate(max_memory: float, limit: float | None) -> dict:
        drop_page_cache(Path(base["model"]))
        drop_page_cache(work_dir / "accel")
        r = run_limited(HF_RUN, {**base, "batch": hf_batch, "offload": str(work_dir / "accel"), "cpu_mem": max_memory},
                        limit)
        rows.append({"part": "b", "system": "transformers+accelerate",
                     "config": f"batch {hf_batch} max_memory {max_memory:g}GiB, limit {r['memory_limit']}", **r})
        print(rows[-1], flush=True)
        return r

    # Under the limit: max_memory at half of it, and where that is killed (float32 activations and
    # the loading path need more than half), at a quarter; then once without a limit.
    if "killed" in accelerate(cpu_mem / 2, cpu_mem).get("error", ""):
        accelerate(cpu_mem / 4, cpu_mem)
    accelerate(cpu_mem, None)
    return rows


def fastest_flops(profile, dtype: str) -> float:
    """FLOP/s of the fastest dense matmul the profile saw, the probe's or a row count of its
    linear-layer table (they differ by up to 40 % on a shared 2-core VM)."""
    from engine.runtime.devices import torch_dtype
    element = torch_dtype(dtype).itemsize
    return max([profile.flops("cpu", dtype)] + [2 * int(rows) / element / s_per_byte for rows, s_per_byte
                                                in profile.linear_s_per_byte.items()])


def step_flops(cfg, block_rows: int, prompt_len: int, gen_len: int) -> list[float]:
    """The linear layers' FLOPs of the prefill, then of each decode step (attention left out: a
    roofline from these is a bound no run can beat)."""
    head = cfg.vocab_size * cfg.embed_dim  # the LM head runs on each row's last position only
    # Multiplied weights per token: not the lookup tables, and the head apart (untied, it is counted)
    body = cfg.param_count() - cfg.lookup_table_param_count() - (0 if cfg.tie_word_embeddings else head)
    return [2 * (body * prompt_len + head) * block_rows] + [2 * (body + head) * block_rows] * (gen_len - 1)


def compute_roofline(rows: list[dict], cfg, opts) -> None:
    """Part (a)'s roofline, step by step: max(weight bytes / the profile's weight-streaming
    bandwidth, FLOPs / the fastest matmul's FLOP/s), the weights all in RAM; for every system's
    run (its rows: generated tokens / gen_len)."""
    from engine.planning.profiler import load_or_measure_profile
    from engine.runtime.devices import torch_dtype
    profile = load_or_measure_profile(opts.work_dir / "offload")
    flops_per_s = fastest_flops(profile, opts.dtype)
    weight_bytes = (cfg.param_count() - cfg.lookup_table_param_count()) * torch_dtype(opts.dtype).itemsize
    memory_s = weight_bytes / (profile.cpu_mem_gbps * 1e9)
    for row in rows:
        if row["part"] != "a" or "error" in row or not row.get("seconds"):
            continue
        block_rows = round(row["tokens_per_s"] * row["seconds"] / opts.gen_len)
        per_step = [max(memory_s, f / flops_per_s) for f in step_flops(cfg, block_rows, opts.prompt_len, opts.gen_len)]
        row.update(roofline_s=sum(per_step), roofline_fraction=sum(per_step) / row["seconds"],
                   measured_flops=flops_per_s, roofline_prefill_s=per_step[0])


def roofline(rows: list[dict], cfg, opts) -> None:
    """Per-run roofline over capacity, step by step: the sum over the prefill and each decode step
    of max(disk seconds, FLOPs / FLOP/s). Disk seconds charge the weights read from the disk tier
    (once per step) at the read bandwidth of files that have sat a while and the KV cache (the rest
    of what the run read, growing with the position) at that of a file read back right after it
    was written, as the cache is one step later: both probed now, alone on the machine (the
    profile's figures are taken beside a compute load, for the planner), and never below the rate
    the run's own reads reached. FLOP/s: `fastest_flops`."""
    from engine.planning.disk_probes import measure_disk
    from engine.planning.profiler import load_or_measure_profile
    offload = opts.work_dir / "offload"
    flops_per_s = fastest_flops(load_or_measure_profile(offload), opts.dtype)
    probe = measure_disk(offload)
    for row in rows:
        if row["part"] != "b" or row["system"] != "flexjob" or "error" in row:
            continue
        seen = row["disk_read_bytes"] / row["disk_read_s"] if row.get("disk_read_s") else 0.0
        settled_bw, fresh_bw = max(probe.read_gbps * 1e9, seen), max(probe.fresh_read_gbps * 1e9, seen)
        steps = opts.gen_len
        weight_bytes = min(row["weights_disk_bytes"], row["disk_read_bytes"] / steps)
        cache_bytes = row["disk_read_bytes"] - weight_bytes * steps  # and the embedding's rows: KiB a step
        # Decode step i (1 .. gen-1) reads the cache of prompt + i positions.
        positions = [opts.prompt_len + i for i in range(1, steps)]
        flops = step_flops(cfg, row["block_rows"], opts.prompt_len, steps)
        step_io = [weight_bytes / settled_bw] + [weight_bytes / settled_bw + cache_bytes * p / sum(positions) / fresh_bw
                                                 for p in positions]
        per_step = [max(io, f / flops_per_s) for io, f in zip(step_io, flops)]
        row["roofline_s"] = sum(per_step)
        row["roofline_fraction"] = row["roofline_s"] / row["seconds"] if row["seconds"] else None
        row["roofline_disk_bound_steps"] = sum(io > f / flops_per_s for io, f in zip(step_io, flops))
        row.update(measured_read_gbps=settled_bw / 1e9, measured_fresh_read_gbps=fresh_bw / 1e9,
                   measured_flops=flops_per_s, weights_read_bytes=weight_bytes * steps, cache_read_bytes=cache_bytes,
                   roofline_prefill_s=per_step[0])


def summarise(rows: list[dict], opts) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"engine vs transformers, {opts.model.name}, prompt {opts.prompt_len}, gen {opts.gen_len}, "
                        f"{opts.dtype}")
    for col in ("part", "system", "config", "tokens/s", "seconds", "peak RSS GiB", "roofline"):
        table.add_column(col)
    for r in rows:
        rss = r.get("child_maxrss") or r.get("peak_rss") or 0
        table.add_row(r["part"], r["system"], r["config"], f"{r.get('tokens_per_s', 0):.2f}" if "error" not in r
                      else r["error"][:40], f"{r.get('seconds', 0):.1f}", f"{rss / 2**30:.2f}",
                      f"{r['roofline_fraction']:.0%}" if r.get("roofline_fraction") else "")
    best = {}
    for r in rows:
        if "tokens_per_s" in r:
            key = (r["part"], r["system"] == "flexjob")
            best[key] = max(best.get(key, 0), r["tokens_per_s"])
    ratios = {part: best[(part, True)] / best[(part, False)] for part in ("a", "b")
              if (part, True) in best and best.get((part, False))}
    Console().print(table)
    for part, ratio in ratios.items():
        print(f"({part}) best flexjob / best baseline: {ratio:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps({"rows": rows, "ratios": ratios, "args": {
        k: str(v) for k, v in vars(opts).items()}, "time": time.time()}, indent=1))


if __name__ == "__main__":
    main()
