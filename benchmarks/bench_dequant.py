"""What dequantising 4-bit weights costs per decode step, against moving the fp16 bytes.

For every weight matrix of one opt-1.3b layer (and the whole layer): the time of
`dequantize(q, dtype, out=buffer)` to bfloat16 and float32 (with a reused output buffer, as the
engine should; and freshly allocated, to show what allocation costs), the time of reading the
fp16 tensor from RAM into a bf16 compute buffer (what the uncompressed path does at least), and
the disk time saved, computed from a disk bandwidth (default 1.1 GB/s: the O_DIRECT median of a
2-vCPU cloud VM's disk — computed, not measured here).

    python benchmarks/bench_dequant.py [--size 1.3b] [--bits 4] [--group-size 64] [--repeat 15]
Prints a table and writes benchmarks/results/bench_dequant.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from engine.runtime.compression import dequantize, packed_nbytes, quantize
from engine.model.config import preset
from engine.model.config import layer_tensor_shapes


def best_ms(fn, repeat: int) -> tuple[float, float]:
    """(min, median) wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[0], times[len(times) // 2]


def measure(shape, *, bits: int, group_size: int, repeat: int, disk_gbps: float) -> dict:
    w = (0.02 * torch.randn(shape)).to(torch.float16)  # [out, in]
    q = quantize(w, num_bits=bits, group_size=group_size)
    packed = packed_nbytes(shape, bits, group_size, -1)
    row = {"shape": list(shape), "fp16_bytes": w.numel() * 2, "packed_bytes": packed}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        buf = torch.empty(shape, dtype=dtype)
        row[f"dequant_{name}_ms"] = best_ms(lambda: dequantize(q, dtype, out=buf), repeat)
        row[f"dequant_{name}_alloc_ms"] = best_ms(lambda: dequantize(q, dtype), repeat)
    bf16 = torch.empty(shape, dtype=torch.bfloat16)
    row["fp16_to_bf16_copy_ms"] = best_ms(lambda: bf16.copy_(w), repeat)
    row["fp16_copy_ms"] = best_ms(lambda: torch.empty_like(w).copy_(w), repeat)
    row["disk_saved_ms"] = (row["fp16_bytes"] - packed) / (disk_gbps * 1e9) * 1e3
    return row


def measure_matmul(shape, *, batch: int, group_size: int, repeat: int) -> dict:
    """One linear at `batch` rows, bf16: dense weight; dequantise + dense; torch's fused int4 kernel
    (repacking the stored codes into its layout, and the engine's batch-invariant call)."""
    import torch.nn.functional as F

    from engine.model import int4_matmul

    w = (0.02 * torch.randn(shape)).to(torch.bfloat16)  # [out, in]
    x = torch.randn(batch, shape[1], dtype=torch.bfloat16)
    q = quantize(w, num_bits=4, group_size=group_size)
    buf = torch.empty(shape, dtype=torch.bfloat16)
    row = {"shape": list(shape), "batch": batch,
           "linear_bf16_ms": best_ms(lambda: F.linear(x, w), repeat),
           "dequant_then_linear_ms": best_ms(lambda: F.linear(x, dequantize(q, torch.bfloat16, out=buf)), repeat)}
    if int4_matmul.fits(tuple(shape), 4, group_size, torch.bfloat16, torch.device("cpu")):
        weight = int4_matmul.pack(q)
        row["repack_ms"] = best_ms(lambda: int4_matmul.pack(q, out=weight.packed.view(-1)), repeat)
        row["fused_int4_ms"] = best_ms(lambda: int4_matmul.linear(x, weight), repeat)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.3b")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--disk-gbps", type=float, default=1.1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_dequant.json"))
    args = parser.parse_args()

    cfg = preset(args.size)
    torch.manual_seed(0)
    rows = {}
    for name, shape in layer_tensor_shapes(cfg):
        if len(shape) == 2:
            rows[name] = measure(shape, bits=args.bits, group_size=args.group_size,
                                 repeat=args.repeat, disk_gbps=args.disk_gbps)
    layer = {k: sum(r[k] for r in rows.values()) for k in ("fp16_bytes", "packed_bytes", "disk_saved_ms")}
    for key in next(iter(rows.values())):
        if key.endswith("_ms") and key != "disk_saved_ms":
            layer[key] = [sum(r[key][i] for r in rows.values()) for i in (0, 1)]

    print(f"opt-{args.size.removeprefix('opt-')}, {args.bits}-bit, group {args.group_size}, "
          f"{torch.get_num_threads()} threads; ms as min / median of {args.repeat}")
    cols = ("dequant_bf16_ms", "dequant_bf16_alloc_ms", "dequant_fp32_ms", "fp16_to_bf16_copy_ms")
    header = f"{'tensor':26} {'shape':>12} {'MiB fp16':>8} {'MiB 4b':>7} " + " ".join(
        f"{c.removesuffix('_ms'):>22}" for c in cols) + f" {'disk saved':>10}"
    print(header)
    for name, r in [*rows.items(), ("whole layer", layer)]:
        shape = "x".join(map(str, r["shape"])) if "shape" in r else ""
        cells = " ".join(f"{r[c][0]:>10.2f} / {r[c][1]:>9.2f}" for c in cols)
        print(f"{name:26} {shape:>12} {r['fp16_bytes'] / 2**20:>8.1f} {r['packed_bytes'] / 2**20:>7.1f} "
              f"{cells} {r['disk_saved_ms']:>9.1f}")
    n_layers = cfg.num_layers
    summary = {
        "model": cfg.name, "bits": args.bits, "group_size": args.group_size,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "disk_gbps_assumed": args.disk_gbps, "layers": rows, "per_layer": layer,
        "per_step_all_layers_ms": {"dequant_bf16": layer["dequant_bf16_ms"][0] * n_layers,
                                   "dequant_fp32": layer["dequant_fp32_ms"][0] * n_layers,
                                   "disk_saved": layer["disk_saved_ms"] * n_layers},
        "compression_ratio": layer["fp16_bytes"] / layer["packed_bytes"],
    }
    print(f"per decode step, {n_layers} layers: dequantise to bf16 "
          f"{summary['per_step_all_layers_ms']['dequant_bf16']:.0f} ms vs "
          f"{summary['per_step_all_layers_ms']['disk_saved']:.0f} ms of disk reads saved at "
          f"{args.disk_gbps} GB/s; ratio {summary['compression_ratio']:.3f}x")
    matmuls = []
    if args.bits == 4:
        print("one linear in bf16, ms (min / median): dense weight | dequantise + dense | fused int4 kernel")
        for name in ("self_attn.q_proj.weight", "fc1.weight", "fc2.weight"):
            shape = dict(layer_tensor_shapes(cfg))[name]
            for batch in (1, 8, 32):
                r = measure_matmul(shape, batch=batch, group_size=args.group_size, repeat=args.repeat)
                matmuls.append({"tensor": name, **r})
                fused = r.get("fused_int4_ms", [math.nan, math.nan])
                print(f"{name:26} batch {batch:>3}: {r['linear_bf16_ms'][0]:7.2f} / {r['linear_bf16_ms'][1]:7.2f} | "
                      f"{r['dequant_then_linear_ms'][0]:7.2f} / {r['dequant_then_linear_ms'][1]:7.2f} | "
                      f"{fused[0]:7.2f} / {fused[1]:7.2f}")
    summary["matmul"] = matmuls
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
