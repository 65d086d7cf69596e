"""Attention on the CPU in bfloat16, one layer at a time: the AVX512-BF16 kernel
(engine/model/native_attention_bf16.c) against the generic native kernel (native_attention.c).

Shapes of one opt-1.3b layer (head_dim 64) for a block of `--rows` rows (rows x 32 heads pairs):
- `decode`: one query per pair over `--keys` cached keys, the aligned layout of a cache in RAM,
  each call on the next of 24 layers' caches (as a decode step reads them: from DRAM, not from a
  cache level that holds one layer);
- `read from disk`: the same over position-major buffers, as a read of a cache part on disk
  leaves them (a pair's keys a whole position apart), attended where they lie;
- `prefill`: a `--prompt`-token prompt's queries over its own keys, causal.
Each variant alternates with the other, and the fastest of `--repeat` rounds is kept. Also the
bytes of keys and values a decode call reads per second.

    python benchmarks/bench_attention.py [--rows 32] [--keys 150] [--prompt 128] [--repeat 7]
Prints a table and writes benchmarks/results/attention.json (`--out`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from engine.model import native_attention
from engine.model.kernel_shapes import key_capacity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4_kernels import fastest  # noqa: E402
from suite_config import present_flags  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, HEAD_DIM, LAYERS = 32, 64, 24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--keys", type=int, default=150)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    args = ap.parse_args()
    if native_attention.bf16_kernel() != "avx512-bf16":
        raise SystemExit("no AVX512-BF16 attention kernel on this CPU (or no C compiler): nothing to compare")
    kernels = ("generic", "avx512-bf16")
    pairs, gen = args.rows * HEADS, torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).bfloat16()

    capacity = key_capacity(max(args.keys, args.prompt))
    caches = [(randn(pairs, capacity, HEAD_DIM), randn(pairs, capacity, HEAD_DIM)) for _ in range(LAYERS)]
    query = randn(pairs, 1, HEAD_DIM) * HEAD_DIM ** -0.5
    last = torch.full((pairs, 1), args.keys - 1)
    decode = {name: (lambda name=name: [native_attention.attend_aligned(query, k, v, last, kernel=name)
                                        for k, v in caches]) for name in kernels}
    # A cache part read from disk: position-major [T, pairs, D] buffers, attended where they lie.
    read = [(randn(args.keys, pairs, HEAD_DIM), randn(args.keys, pairs, HEAD_DIM)) for _ in range(LAYERS)]
    first = torch.zeros(pairs, dtype=torch.long)
    from_disk = {name: (lambda name=name: [native_attention.attend_position_major(query, k, v, first, last,
                                                                                  kernel=name)
                                           for k, v in read]) for name in kernels}
    prompt_queries = randn(pairs, args.prompt, HEAD_DIM) * HEAD_DIM ** -0.5
    causal = torch.arange(args.prompt)[None, :].expand(pairs, -1).contiguous()
    k, v = caches[0]
    prefill = {name: (lambda name=name: native_attention.attend_aligned(prompt_queries, k, v, causal, kernel=name))
               for name in kernels}
    decode_s = {name: s / LAYERS for name, s in fastest(decode, args.repeat).items()}
    from_disk_s = {name: s / LAYERS for name, s in fastest(from_disk, args.repeat).items()}
    prefill_s = fastest(prefill, args.repeat)
    read_bytes = 2 * pairs * args.keys * HEAD_DIM * 2
    print(f"{platform.processor() or platform.machine()} [{present_flags()}], bfloat16, "
          f"{torch.get_num_threads()} threads; {pairs} pairs, head_dim {HEAD_DIM}")
    print(f"{'kernel':>12} {'decode ms':>10} {'GB/s':>6} {'read from disk ms':>18} {'prefill ms':>11}")
    for name in kernels:
        print(f"{name:>12} {decode_s[name] * 1e3:>10.2f} {read_bytes / decode_s[name] / 1e9:>6.1f} "
              f"{from_disk_s[name] * 1e3:>18.2f} {prefill_s[name] * 1e3:>11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_flags": present_flags(), "threads": torch.get_num_threads(),
                                    "pairs": pairs, "keys": args.keys, "prompt": args.prompt,
                                    "decode_s": decode_s, "decode_read_from_disk_s": from_disk_s,
                                    "prefill_s": prefill_s}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
