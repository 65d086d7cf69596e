"""4-bit matrices on the CPU, one linear call at a time: the engine's 4-bit kernel against the dense
library on the dequantised matrix, and the dequantisation itself.

For each matrix shape of one opt-1.3b layer and its output head, and each row count, the GFLOP/s of
- `4-bit kernel`: what generated tokens run on (engine.model.four_bit picks it: int4_float32 in
  float32, int4_bfloat16 in bfloat16 with AVX512-BF16, else torch's int4 kernel, int4_matmul);
- `torch int4` (bfloat16 where flexjob's kernel runs): torch's int4 kernel on its repacked
  copy, what bfloat16 ran on before;
- `dense`: the library call generated tokens make on an uncompressed matrix
  (engine.model.kernels.library_linear; oneDNN in float32);
- `dequantise + dense`: a per-step dequantised copy into a reused buffer, then the dense call
  (what 4-bit weights cost without a kernel);
and the milliseconds of dequantising the matrix: the engine's prompt-token copy against
`compression.dequantize`. The variants alternate, and the fastest of `--repeat` rounds is kept.

    python benchmarks/bench_int4_kernels.py [--dtype float32] [--rows 8,32,64,256] [--repeat 9]
Prints a table and writes benchmarks/results/int4_kernels.json (`--out`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from engine.model import four_bit, int4_matmul, kernels
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--rows", default="8,32,64,256")
    ap.add_argument("--repeat", type=int, default=9)
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
    print(f"{'matrix':>12} {'rows':>5} {'4-bit kernel':>13} {'torch int4':>11} {'dense':>7} {'dequantise+dense':>17}"
          "  GFLOP/s")
    for n, k in shapes:
        q = quantize(torch.randn(n, k, generator=gen) * 0.05, num_bits=4, group_size=64, dim=-1)
        weight = q if kernel_module in four_bit.READ_IN_PLACE else int4_matmul.pack(q)
        repacked = int4_matmul.pack(q) if beside_torch else None
        dense = dequantize(q, dtype)
        buffer = torch.empty_like(dense)
        bias = torch.randn(n, generator=gen).to(dtype)
        for rows in rows_list:
            x = torch.randn(rows, k, generator=gen).to(dtype)
            calls = {
                "4-bit kernel": lambda: four_bit.multiply(x, weight, bias),
                "dense": lambda: kernels.library_linear(x, dense, bias),
                "dequantise + dense": lambda: kernels.library_linear(x, dequantize(q, dtype, out=buffer), bias),
            }
            if repacked is not None:
                calls["torch int4"] = lambda: int4_matmul.linear(x, repacked, bias)
            gflops = {name: 2 * rows * n * k / s / 1e9 for name, s in fastest(calls, args.repeat).items()}
            records.append({"shape": [n, k], "rows": rows, "gflops": gflops})
            torch_int4 = f"{gflops['torch int4']:>11.0f}" if "torch int4" in gflops else f"{'-':>11}"
            print(f"{n:>5} x {k:<5} {rows:>5} {gflops['4-bit kernel']:>13.0f} {torch_int4} {gflops['dense']:>7.0f} "
                  f"{gflops['dequantise + dense']:>17.0f}")
        if kernel_module in four_bit.READ_IN_PLACE:
            ms = {name: s * 1e3 for name, s in fastest({
                "engine": lambda: four_bit.dequantized(q, dtype, lambda slot, shape, dt: buffer),
                "compression.dequantize": lambda: dequantize(q, dtype, out=buffer)}, args.repeat).items()}
            records.append({"shape": [n, k], "dequantise_ms": ms})
            print(f"{n:>5} x {k:<5} dequantise: engine {ms['engine']:.1f} ms, compression.dequantize "
                  f"{ms['compression.dequantize']:.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu_flags": present_flags(), "dtype": args.dtype,
                                    "threads": torch.get_num_threads(), "results": records}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
