"""FlexGen's tutorial experiment: memory vs speed for five placements of opt-1.3b.

    python examples/flexgen_tutorial_policies.py --model models/opt-1.3b [--gen-len 32]

Runs each of the tutorial's `--percent` policies through `flexjob generate` in its own process and
prints the peak memory per tier and the throughput of each. Without a GPU the "GPU" share is RAM
(the compute device's memory), so the first and third policies differ from the others only in
where the KV cache and activations live; the disk share is a real, page-cache-bypassing disk tier.
(Create the model first: `flexjob make-model 1.3b -o models/opt-1.3b`.)
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from engine.runtime.paths import engine_home

TUTORIAL_POLICIES = [
    "100 0 100 0 100 0",   # everything on the GPU
    "10 90 0 100 0 100",   # weights mostly on CPU, cache and activations on CPU
    "90 10 100 0 100 0",
    "5 95 0 100 0 100",
    "70 30 0 100 0 100",
]


def run_policy(model: Path, percent: str, args) -> dict:
    cmd = [sys.executable, "-m", "jobrunner.cli", "generate", "--model", str(model),
           "--max-new-tokens", str(args.gen_len), "--gpu-batch-size", str(args.gpu_batch_size),
           "--percent", *percent.split(), "--offload-dir", str(args.offload_dir)]
    for _ in range(args.gpu_batch_size):
        cmd += ["--prompt", args.prompt]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"percent": percent, "error": proc.stderr.strip().splitlines()[0] if proc.stderr else "failed"}
    out = proc.stdout
    number = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    return {"percent": percent, "tokens_per_s": number(r"overall: ([\d.]+)"),
            "peak_rss_gib": number(r"peak RSS: ([\d.]+)"),
            "weights": re.search(r"weights per tier \(GiB\): (.*)", out).group(1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-batch-size", type=int, default=4)
    ap.add_argument("--prompt", default="Paris is the capital city of")
    ap.add_argument("--offload-dir", type=Path, default=engine_home())
    args = ap.parse_args()
    print(f"{'--percent':<22}{'tokens/s':>10}{'peak RSS GiB':>14}  weights per tier (GiB)")
    for percent in TUTORIAL_POLICIES:
        r = run_policy(args.model, percent, args)
        if "error" in r:
            print(f"{percent:<22}  {r['error']}")
        else:
            print(f"{percent:<22}{r['tokens_per_s']:>10.2f}{r['peak_rss_gib']:>14.2f}  {r['weights']}")


if __name__ == "__main__":
    main()
