"""4-bit matrices on the CPU, one linear call at a time: the engine's 4-bit kernel against the dense
library on the dequantised matrix, and the dequantisation itself.

For each matrix shape of one opt-1.3b layer and its output head, and each row count, the GFLOP/s of
- `4-bit kernel`: what generated tokens run on (engine.model.four_bit picks it: int4_float32 in
  float32, int4_bfloat16 in bfloat16 with AVX512-BF16, else torch's int4 kernel, int4_matmul);
- `torch int4` (bfloat16 where flexjob's kernel runs): torch's int4 kernel on its repacked
  copy, what bfloat16 ran on before;
- `dense`: the library call generated tokens make on an uncompressed matrix
  (engine.model.kernels.library_linear; oneDNN in float32);
- `dense packed`: the same matrix in the library's blocked layout, as the engine holds an
  uncompressed matrix that stays in RAM (kernels.pack_for_cpu): what 4-bit weights in RAM race;
- `dequantise + dense`: a per-step dequantised copy into a reused buffer, then the dense call
  (what 4-bit weights cost without a kernel);
and the milliseconds of dequantising the matrix: the engine's prompt-token copy against
`compression.dequantize`. The variants alternate, and the fastest of `--repeat` rounds is kept.

`--from-ram MB`: each call goes to the next of enough distinct copies of the matrix that the
4-bit copies alone hold MB megabytes (more than the last-level cache), so every variant reads its
weights from RAM, as a decode step does; 0 (the default) repeats one copy, which stays in cache.

    python benchmarks/bench_int4_kernels.py [--dtype float32] [--rows 8,32,64,256] [--repeat 9] [--from-ram 64]
Prints a table and writes benchmarks/results/int4_kernels.json (`--out`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

from engine.model import four_bit, int4_matmul, kernels, packed_weight
from engine.model.config import layer_tensor_shapes, preset
from engine.runtime.compression import dequantize, quantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_config import present_flags  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fastest(calls: dict, repeat: int) -> dict[str, float]:
    """Seconds of the fastest call of each variant, the variants alternating round by round."""
    best = {name: float("inf") for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def cycled(operands: list, call):
    """A call without arguments that passes `call` the next of `operands` each time, round and round."""
    turn = itertools.cycle(operands)
    return lambda: call(next(turn))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--rows", default="8,32,64,256")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--from-ram", type=float, default=0.0, metavar="MB",
                    help="cycle through copies whose 4-bit bytes exceed MB (0: one copy, cached)")
    ap.add_argument("--out", type=Path, default=RESULTS / "int4_kernels.json")
    args = ap.parse_args()
    dtype, cpu = getattr(torch, args.dtype), torch.device("cpu")
    cfg = preset("1.3b")
    shapes = sorted({shape for name, shape in layer_tensor_shapes(cfg) if len(shape) == 2})
    shapes.append((cfg.vocab_size, cfg.hidden_size))  # the output head
    kernel_module = four_bit.four_bit_kernel(shapes[0], 4, 64, dtype, cpu)
    if kernel_module is None:
        raise SystemExit(f"no 4-bit kernel for {args.dtype} on this CPU")
    beside_torch = kernel_module in four_bit.READ_IN_PLACE and int4_matmul.fits(shapes[0], 4, 64, dtype, cpu)
    gen = torch.Generator().manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    records = []
    print(f"{platform.processor() or platform.machine()} [{present_flags()}], {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"kernel: {kernel_module.__name__}")
    print(f"{'matrix':>12} {'rows':>5} {'copies':>6} {'4-bit kernel':>13} {'torch int4':>11} {'dense':>7} "
          f"{'dense packed':>13} {'dequantise+dense':>17}  GFLOP/s")
    for n, k in shapes:
        q = quantize(torch.randn(n, k, generator=gen) * 0.05, num_bits=4, group_size=64, dim=-1)
        copies = max(1, -(-int(args.from_ram * 1e6) // q.nbytes))
        quantized = [q] + [quantize(torch.randn(n, k, generator=gen) * 0.05, num_bits=4, group_size=64, dim=-1)
                           for _ in range(copies - 1)]
        weights = [w if kernel_module in four_bit.READ_IN_PLACE else int4_matmul.pack(w) for w in quantized]
        repacked = [int4_matmul.pack(w) for w in quantized] if beside_torch else None
        dense = [dequantize(w, dtype) for w in quantized]
        packed = [kernels.pack_for_cpu(d) for d in dense]
        buffer = torch.empty_like(dense[0])
        bias = torch.randn(n, generator=gen).to(dtype)
        for rows in rows_list:
            x = torch.randn(rows, k, generator=gen).to(dtype)
            calls = {
                "4-bit kernel": cycled(weights, lambda w: four_bit.multiply(x, w, bias)),
                "dense": cycled(dense, lambda d: kernels.library_linear(x, d, bias)),
                "dequantise + dense": cycled(quantized,
                                             lambda w: kernels.library_linear(x, dequantize(w, dtype, out=buffer), bias)),
            }
            if isinstance(packed[0], packed_weight.PackedWeight):
                calls["dense packed"] = cycled(packed, lambda p: kernels.library_linear(x, p, bias))
            if repacked is not None:
                calls["torch int4"] = cycled(repacked, lambda w: int4_matmul.linear(x, w, bias))
            gflops = {name: 2 * rows * n * k / s / 1e9 for name, s in fastest(calls, args.repeat * copies).items()}
            records.append({"shape": [n, k], "rows": rows, "copies": copies, "gflops": gflops})
            optional = {name: f"{gflops[name]:.0f}" if name in gflops else "-" for name in ("torch int4", "dense packed")}
            print(f"{n:>5} x {k:<5} {rows:>5} {copies:>6} {gflops['4-bit kernel']:>13.0f} {optional['torch int4']:>11} "
                  f"{gflops['dense']:>7.0f} {optional['dense packed']:>13} {gflops['dequantise + dense']:>17.0f}")
        if kernel_module in four_bit.READ_IN_PLACE:
            ms = {name: s * 1e3 for name, s in fastest({
                "engine": lambda: four_bit.dequantized(q, dtype, lambda slot, shape, dt: buffer),
                "compression.dequantize": lambda: dequantize(q, dtype, out=buffer)}, args.repeat).items()}
            records.append({"shape": [n, k], "dequantise_ms": ms})
            print(f"{n:>5} x {k:<5} dequantise: engine {ms['engine']:.1f} ms, compression.dequantize "
                  f"{ms['compression.dequantize']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_flags": present_flags(), "dtype": args.dtype, "from_ram_mb": args.from_ram,
                                    "threads": torch.get_num_threads(), "results": records}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
