"""What 4-bit group-wise compression costs in quality, on a small trained OPT.

Trains (once, ~2 min, cached under tests/.cache/) a tiny OPT on the Python standard library's
sources (tests/support/quality_model.py) and measures, on held-out files: perplexity with fp16 weights,
4-bit layer weights, 4-bit weights + embeddings, 4-bit KV cache, and weights + cache; and greedy
agreement with the uncompressed model over the first new tokens of held-out prompts.
How each variant is computed (HF OPTForCausalLM with round-tripped weights; the cache
round-tripped after every step of a token-by-token pass) is described in tests/support/quality_model.py.

    python benchmarks/bench_compression_quality.py [--bits 4 ...] [--group-size 64]
Prints a table and writes benchmarks/results/bench_compression_quality.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.support.quality_model
from tests.support.quality_model import VARIANTS, get_quality_model, measure_quality  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--ppl-windows", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_compression_quality.json"))
    args = parser.parse_args()

    model_dir = get_quality_model(log=lambda msg: print(msg, flush=True))
    meta = json.loads((model_dir / "meta.json").read_text())
    print(f"model {model_dir} ({meta['recipe']['layers']} layers, hidden {meta['recipe']['hidden']}, "
          f"vocab {meta['recipe']['vocab']}, trained {meta['train_seconds']} s)")
    started = time.perf_counter()
    runs = [measure_quality(model_dir, bits=bits, group_size=args.group_size,
                            ppl_windows=args.ppl_windows, prompts=args.prompts,
                            new_tokens=args.new_tokens,
                            variants=VARIANTS if bits == args.bits[0] else tuple(v for v in VARIANTS if v != "fp16"))
            for bits in args.bits]
    first = runs[0]
    print(f"perplexity over {first['ppl_tokens']} held-out tokens; greedy agreement over the first "
          f"{first['new_tokens']} tokens of {first['prompts']} prompts of {first['prompt_length']} tokens")
    print(f"{'variant':24} {'bits':>4} {'perplexity':>10} {'change':>8} {'prefix agree':>12} {'identical':>9}")
    fp = first["variants"]["fp16"]["perplexity"]
    for run in runs:
        for name, r in run["variants"].items():
            change = 100 * (r["perplexity"] / fp - 1)
            bits = "-" if name == "fp16" else run["bits"]
            print(f"{name:24} {bits:>4} {r['perplexity']:>10.3f} {change:>+7.2f}% "
                  f"{r['prefix_fraction']:>12.3f} {r['identical_rows']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model_dir": str(model_dir), "model": meta, "torch": torch.__version__,
                               "group_size": args.group_size, "runs": runs,
                               "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
