"""4-bit weights against 16-bit weights, in RAM and read from disk each step, side by side.

    python benchmarks/bench_compression_speed.py --model /work/models/opt-1.3b --blocks 16x1,32x1

For each block shape and placement, the uncompressed and the 4-bit run alternate (fresh
subprocesses; the page cache is dropped before each disk run, and the engine bypasses it), and the
best of `--repeats` is kept. In RAM, 4-bit matrices run on the fused int4 kernel in bfloat16
(engine.model.int4_matmul); from disk they read ~3.5x fewer bytes and are repacked for that kernel
(or dequantised where it does not apply). Reports tokens/s, the 4-bit / 16-bit ratio, prefill
seconds, disk bytes and seconds, repack/dequantisation seconds per step and peak RSS.
Results: benchmarks/results/compression_speed.json (`--out`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ENGINE_RUN, RESULTS, drop_page_cache, run_child_rss  # noqa: E402

PLACEMENTS = {"ram": [100, 0, 100, 0, 100, 0], "disk": [0, 0, 100, 0, 100, 0]}  # weights in RAM / on disk


def run_pair(model: Path, offload: Path, *, prompt_len: int, gen_len: int, gbs: int, nb: int,
             cpu_mem: float | None, placement: str = "disk") -> list[dict]:
    """One run with uncompressed and one with 4-bit weights under `placement` ("ram": every weight
    resident; "disk": every weight read from the disk tier each step); one row each,
    `compress_weight` telling which."""
    from engine.runtime.devices import default_dtype_name

    rows = []
    for compress in (False, True):
        if placement == "disk" and offload.exists():
            drop_page_cache(offload)
        r = run_child_rss(ENGINE_RUN, dict(model=str(model), dtype=default_dtype_name(), prompt_len=prompt_len,
                                           gen_len=gen_len, percent=PLACEMENTS[placement], gbs=gbs, nb=nb,
                                           offload=str(offload), cpu_mem=cpu_mem if placement == "disk" else None,
                                           compress_weight=compress))
        rows.append({"compress_weight": compress, "placement": placement, "block": f"{gbs}x{nb}", **r})
        print(rows[-1], flush=True)
    return rows


def best_rows(rows: list[dict]) -> dict[tuple, dict]:
    """The fastest run of each (placement, block, compress_weight)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["placement"], r["block"], r["compress_weight"])
        if "error" not in r and r["tokens_per_s"] > best.get(key, {}).get("tokens_per_s", -1):
            best[key] = r
    return best


def print_table(best: dict[tuple, dict]) -> list[dict]:
    """One line per (placement, block): 16-bit and 4-bit side by side; returns the ratios."""
    print(f"{'weights':<8}{'block':>7}{'16-bit tok/s':>14}{'4-bit tok/s':>13}{'4b/16b':>8}{'prefill s 16/4':>16}"
          f"{'disk GB 16/4':>14}{'repack s/step':>15}{'RSS GiB 16/4':>14}")
    ratios = []
    for placement, block in sorted({(p, b) for p, b, _ in best}):
        plain, four = best.get((placement, block, False)), best.get((placement, block, True))
        if not plain or not four:
            continue
        ratio = four["tokens_per_s"] / plain["tokens_per_s"]
        ratios.append({"placement": placement, "block": block, "ratio": ratio})
        print(f"{placement:<8}{block:>7}{plain['tokens_per_s']:>14.2f}{four['tokens_per_s']:>13.2f}{ratio:>8.2f}"
              f"{plain['prefill_s']:>8.1f}/{four['prefill_s']:<7.1f}"
              f"{plain['disk_read_bytes'] / 1e9:>7.2f}/{four['disk_read_bytes'] / 1e9:<6.2f}"
              f"{four['dequantize_s'] / four['steps']:>15.3f}"
              f"{plain['peak_rss'] / 2**30:>7.2f}/{four['peak_rss'] / 2**30:<6.2f}")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/flexjob-bench-compression"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--blocks", default="16x1,32x1")
    ap.add_argument("--placements", default="ram,disk")
    ap.add_argument("--cpu-mem", type=float, default=2.0, help="GiB, for the disk runs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "compression_speed.json")
    opts = ap.parse_args()
    rows = []
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(opts.repeats):
        for block in opts.blocks.split(","):
            gbs, nb = (int(x) for x in block.split("x"))
            for placement in opts.placements.split(","):
                rows += run_pair(opts.model, opts.work_dir / "offload", prompt_len=opts.prompt_len,
                                 gen_len=opts.gen_len, gbs=gbs, nb=nb, cpu_mem=opts.cpu_mem, placement=placement)
                write(opts, rows)  # after every pair: a run cut short keeps what it measured
    write(opts, rows, print_table(best_rows(rows)))


def write(opts: argparse.Namespace, rows: list[dict], ratios: list[dict] | None = None) -> None:
    opts.out.write_text(json.dumps(
        {"rows": rows, "ratios": ratios, "args": {k: str(v) for k, v in vars(opts).items()}}, indent=1))


if __name__ == "__main__":
    main()
