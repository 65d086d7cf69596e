"""What a KV cache partly on disk costs a CPU-only decode step, and where that time goes.

Each policy runs in a fresh process, the policies alternated for --rounds rounds, no memory budget
(so the allocator setting is the same for all). Per run: the prefill's seconds, the mean decode
step, how long the compute thread waited for the I/O thread's reads (Future.result on the main
thread), and the user and system CPU seconds of the compute threads and of the rest (the I/O
thread), from /proc. A step slower by more than the compute thread waited is compute slowed down
beside the I/O, which the cost model charges as `io_compute_interference` x disk seconds.

    python benchmarks/bench_cache_on_disk.py --model /work/models/opt-1.3b --offload-dir D \\
        [--rows 32] [--gen-len 16] [--rounds 3] [--policies "0 100 0 100 0 100;0 100 0 76.55 0 100"]
Prints a table (medians over the rounds) and writes benchmarks/results/cache_on_disk.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import RESULTS, ROOT, run_child  # noqa: E402

sys.path.insert(0, str(ROOT))
from benchmarks.suite_config import present_flags  # noqa: E402

CHILD = r"""
import concurrent.futures as cf, json, os, sys, threading, time
import engine
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput

args = json.loads(sys.argv[1])
rows, gen_len = args["rows"], args["gen_len"]
waited = [0.0]
result, main = cf.Future.result, threading.main_thread()

def timed_result(self, timeout=None):
    if threading.current_thread() is not main:
        return result(self, timeout)
    started = time.perf_counter()
    try:
        return result(self, timeout)
    finally:
        waited[0] += time.perf_counter() - started

cf.Future.result = timed_result
policy = Policy.from_percents([float(p) for p in args["percents"].split()], gpu_batch_size=rows,
                              num_gpu_batches=1).replace(overlap=args["overlap"])
with Engine(args["model"], policy, offload_dir=args["offload"]) as eng:
    prompts = [RowInput(row_id=i, prompt_ids=tuple(2 + (i * 31 + j) % 5000 for j in range(128)))
               for i in range(rows)]
    eng.generate(prompts, GenerationParams(max_new_tokens=gen_len))
    block = eng.stats.blocks[-1]
    tick, threads = os.sysconf("SC_CLK_TCK"), []
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        threads.append((int(fields[11]) / tick, int(fields[12]) / tick))
    threads.sort(key=lambda t: -sum(t))
    compute = threads[:2]  # the main thread and torch's other intra-op thread: the two busiest
    rest = threads[2:]
    print(json.dumps({"prefill_s": block.prefill_s,
                      "decode_step_s": (block.total_s - block.prefill_s) / max(gen_len - 1, 1),
                      "waited_s": waited[0],
                      "disk_read_gb": block.transfers.get("disk_read", (0, 0))[0] / 1e9,
                      "compute_user_s": sum(u for u, _ in compute), "compute_sys_s": sum(s for _, s in compute),
                      "other_cpu_s": sum(u + s for u, s in rest)}))
"""

COLUMNS = ("prefill_s", "decode_step_s", "waited_s", "disk_read_gb", "compute_user_s", "compute_sys_s",
           "other_cpu_s")


def run(args, percents: str, overlap: bool) -> dict:
    # The child runs from the repository root: paths are passed absolute.
    result = run_child(CHILD, {"model": str(Path(args.model).resolve()),
                               "offload": str(Path(args.offload_dir).resolve()), "percents": percents,
                               "rows": args.rows, "gen_len": args.gen_len, "overlap": overlap})
    if "error" in result:
        raise SystemExit(f"{percents}: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--offload-dir", required=True)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default="0 100 0 100 0 100;0 100 0 76.55 0 100",
                        help="';'-separated percents (weights, cache, activations: GPU CPU each)")
    parser.add_argument("--no-overlap-too", action="store_true", help="also run each disk policy without overlap")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    cases = [(p.strip(), True) for p in args.policies.split(";")]
    if args.no_overlap_too:
        cases += [(p, False) for p, _ in cases if p.split()[3] != "100"]
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for percents, overlap in cases:
            name = f"{args.rows}x1 [{percents}]" + ("" if overlap else " no overlap")
            runs.setdefault(name, []).append(run(args, percents, overlap))
            print(f"round {round_index + 1}: {name}: {runs[name][-1]}", flush=True)
    medians = {name: {c: statistics.median(r[c] for r in rs) for c in COLUMNS} for name, rs in runs.items()}
    flags = present_flags()
    print(f"\nCPU flags: {flags}; {args.rounds} rounds, medians; prompt 128, gen {args.gen_len}")
    print("| policy | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, m in medians.items():
        print(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in COLUMNS) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_on_disk.json").write_text(json.dumps(
        {"machine": platform.machine(), "cpu_flags": flags, "args": vars(args), "runs": runs,
         "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
