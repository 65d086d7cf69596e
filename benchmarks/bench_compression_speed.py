"""Weights on disk with and without 4-bit compression, at the same --cpu-mem.

    python benchmarks/bench_compression_speed.py --model /work/models/opt-1.3b

Both runs read every weight from the disk tier each step (page cache bypassed); compressed weights
read ~3.5x fewer bytes and pay for dequantisation instead. Reports tokens/s, the ratio, disk bytes
and seconds, and dequantisation time per step. Each run is a fresh subprocess, alternated.
Results: benchmarks/results/compression_speed.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ENGINE_RUN, RESULTS, drop_page_cache, run_child_rss  # noqa: E402


def run_pair(model: Path, offload: Path, *, prompt_len: int, gen_len: int, gbs: int, nb: int,
             cpu_mem: float) -> list[dict]:
    """One run with uncompressed and one with 4-bit weights, both read from the disk tier each step
    (page cache dropped first); one row each, `compress_weight` telling which."""
    from engine.runtime.devices import default_dtype_name

    rows = []
    for compress in (False, True):
        drop_page_cache(offload) if offload.exists() else None
        r = run_child_rss(ENGINE_RUN, dict(model=str(model), dtype=default_dtype_name(), prompt_len=prompt_len,
                                           gen_len=gen_len, percent=[0, 0, 100, 0, 100, 0], gbs=gbs, nb=nb,
                                           offload=str(offload), cpu_mem=cpu_mem, compress_weight=compress))
        rows.append({"compress_weight": compress, **r})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/flexjob-bench-compression"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--block", default="8x1")
    ap.add_argument("--cpu-mem", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=1)
    opts = ap.parse_args()
    gbs, nb = (int(x) for x in opts.block.split("x"))
    rows = []
    for _ in range(opts.repeats):
        rows += run_pair(opts.model, opts.work_dir / "offload", prompt_len=opts.prompt_len, gen_len=opts.gen_len,
                         gbs=gbs, nb=nb, cpu_mem=opts.cpu_mem)
    best = {c: max((r.get("tokens_per_s", 0) for r in rows if r["compress_weight"] == c), default=0)
            for c in (False, True)}
    ratio = best[True] / best[False] if best[False] else None
    print(f"{'compress':<10}{'tokens/s':>10}{'disk GB':>10}{'disk s':>10}{'dequant s/step':>16}{'peak RSS GiB':>14}")
    for r in rows:
        if "error" in r:
            print(f"{str(r['compress_weight']):<10}  {r['error']}")
            continue
        print(f"{str(r['compress_weight']):<10}{r['tokens_per_s']:>10.2f}{r['disk_read_bytes'] / 1e9:>10.2f}"
              f"{r['disk_read_s']:>10.1f}{r['dequantize_s'] / r['steps']:>16.3f}{r['peak_rss'] / 2**30:>14.2f}")
    if ratio:
        print(f"compressed / uncompressed tokens/s: {ratio:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression_speed.json").write_text(json.dumps({"rows": rows, "ratio": ratio,
                                                                "args": {k: str(v) for k, v in vars(opts).items()}},
                                                               indent=1))


if __name__ == "__main__":
    main()
