"""What batch-invariant kernels cost: the engine at HEAD against the engine at another commit.

    python benchmarks/bench_invariance_cost.py --model DIR --before REV [--rounds 2]

The other commit is exported to a temporary directory; both trees run the same block shapes and
placements in fresh subprocesses, alternating run by run so machine noise hits both alike. Metric:
generated tokens/s over the whole generate call, prefill included. Results:
benchmarks/results/invariance_cost.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ENGINE_RUN, ROOT, RESULTS, drop_page_cache, run_child  # noqa: E402
from suite_config import present_flags  # noqa: E402

CASES = {  # name -> (gpu_batch_size, num_gpu_batches, percents)
    "32x1 in RAM": (32, 1, [100, 0, 100, 0, 100, 0]),
    "32x2 in RAM": (32, 2, [100, 0, 100, 0, 100, 0]),
    "8x1 in RAM": (8, 1, [100, 0, 100, 0, 100, 0]),
    "32x2 weights 50% on disk": (32, 2, [0, 50, 100, 0, 100, 0]),
}


def export(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    from engine.runtime.devices import default_dtype_name

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--before", required=True, help="git revision to compare HEAD's working tree against")
    ap.add_argument("--dtype", default=default_dtype_name())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--cases", default=",".join(CASES))
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flexjob-inv-"))
    trees = {"before": export(opts.before, work), "after": ROOT}
    measured: dict[tuple[str, str], list[float]] = {}
    for _ in range(opts.rounds):
        for name in opts.cases.split(","):
            gbs, nb, percent = CASES[name]
            for label, source in trees.items():
                drop_page_cache(opts.model)
                args = dict(model=str(opts.model), dtype=opts.dtype, prompt_len=opts.prompt_len,
                            gen_len=opts.gen_len, percent=percent, gbs=gbs, nb=nb,
                            offload=str(work / f"offload-{label}"), cpu_mem=None)
                r = run_child(ENGINE_RUN, args, source)
                if "error" in r:
                    raise SystemExit(f"{label} {name}: {r['error']}")
                measured.setdefault((name, label), []).append(r["tokens_per_s"])
                print(f"{label:6} {name:28} {r['tokens_per_s']:7.2f} tokens/s", flush=True)
    rows = []
    print(f"\nCPU: {present_flags()}; dtype {opts.dtype}; prompt {opts.prompt_len}, gen {opts.gen_len}\n")
    print("| case | before tokens/s | after tokens/s | after / before |\n|---|---|---|---|")
    for name in opts.cases.split(","):
        before, after = (statistics.median(measured[name, k]) for k in ("before", "after"))
        rows.append(dict(case=name, before=before, after=after, ratio=after / before))
        print(f"| {name} | {before:.2f} | {after:.2f} | {after / before:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "invariance_cost.json").write_text(json.dumps(
        {"cpu": present_flags(), "dtype": opts.dtype, "before": opts.before, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
