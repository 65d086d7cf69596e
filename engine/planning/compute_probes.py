"""Compute and memory probes: FLOP/s, a linear layer's time per weight byte, memory and link
bandwidths, attention over a CPU cache, decompression and conversion speed, per-op overhead.

Every number is what the engine's own operations see, not a datasheet figure: "memory
bandwidth" is the weight-streaming rate of a batch-1 linear layer in the compute dtype, which is
what bounds small-batch decode on a CPU; CPU attention is a decode step's attention over a KV
cache, in cache bytes per second.
"""
from __future__ import annotations

import torch

from engine.model.attention import attend_aligned
from engine.model.kernels import library_linear, pack_for_cpu
from engine.planning.timing import sync_for, timed


def matmul_flops(device: str, dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Dense FLOP/s of a linear layer in the engine's layout (weight [out, in]) through the library
    call the engine makes (kernels.library_linear), which on some CPUs is many times faster than
    a @ b of the same size in bf16."""
    n = 2048 if device == "cuda" else 1024
    x = torch.full((n, n), 0.5, device=device, dtype=dtype)
    w = torch.full((n, n), 0.01, device=device, dtype=dtype)
    with torch.inference_mode():
        return 2 * n ** 3 / timed(lambda: library_linear(x, w, prefill=True), seconds, sync_for(device))


LINEAR_ROWS = (1, 8, 32, 128, 512, 2048)
PREFILL_ROWS_FROM = 512  # from here on the table times the prefill's library (a prefill's calls are this big)


def linear_table(device: str, dtype: torch.dtype, seconds: float = 0.25, *, packed: bool = True) -> dict[str, float]:
    """Seconds per weight byte of the engine's linear call at several row counts, cycling through
    weights that do not fit in the caches. Measured here (bf16, 2 vCPU Zen4): 17 GB/s of weights at 1 row, 367
    GFLOP/s at 32 rows, 590 at 128, 1080 at 2048: a single peak FLOP/s and a single bandwidth
    (the roofline) predict a 32-row decode matmul twice too fast."""
    k, n = 2048, 8192
    # 8 x 32 MiB in bf16, held as the engine holds weights that stay in RAM (packed on a CPU), or
    # as it multiplies those streamed from disk (plain).
    hold = pack_for_cpu if packed else (lambda w: w)
    weights = [hold(torch.full((n, k), 0.01, device=device, dtype=dtype)) for _ in range(8)]
    table = {}
    with torch.inference_mode():
        for rows in LINEAR_ROWS:
            x = torch.full((rows, k), 0.5, device=device, dtype=dtype)
            used = weights if rows < 512 else weights[:2]  # big row counts are compute-bound: fewer suffice

            def run(x=x, used=used, prefill=rows >= PREFILL_ROWS_FROM):
                for w in used:
                    library_linear(x, w, prefill=prefill)
            nbytes = len(used) * n * k * x.element_size()
            table[str(rows)] = timed(run, seconds, sync_for(device)) / nbytes
    return table


FOUR_BIT_ROWS = (1, 8, 32, 128)


def four_bit_linear_table(dtype: torch.dtype, seconds: float = 0.25, *, group: int = 64) -> dict[str, float]:
    """`linear_table` for generated tokens over 4-bit matrices on the CPU's 4-bit kernel
    (engine.model.four_bit), in seconds per byte of the matrix in `dtype` (what the cost model
    counts a layer's weights in); empty where no kernel takes such a matrix. The kernels take any
    number of rows in one call, and their speed is their own: on AMX flexjob's kernel multiplies
    a 32-row decode call ~1.3x faster than bfloat16 weights, torch's int4 kernel ~4x slower."""
    from engine.model import four_bit, int4_matmul
    from engine.runtime.compression import quantize

    k, n = 2048, 8192
    kernel = four_bit.four_bit_kernel((n, k), 4, group, dtype, torch.device("cpu"))
    if kernel is None:
        return {}
    gen = torch.Generator().manual_seed(0)
    quantized = [quantize(torch.randn(n, k, generator=gen).half(), num_bits=4, group_size=group) for _ in range(8)]
    weights = [int4_matmul.pack(q) if kernel is int4_matmul else q for q in quantized]  # ~70 MB of codes
    table = {}
    with torch.inference_mode():
        for rows in FOUR_BIT_ROWS:
            x = torch.full((rows, k), 0.5, dtype=dtype)

            def run(x=x):
                for w in weights:
                    four_bit.multiply(x, w, None)
            table[str(rows)] = timed(run, seconds) / (len(weights) * n * k * x.element_size())
    return table


def weight_stream_gbps(seconds: float = 0.25, *, dtype: torch.dtype = torch.bfloat16, stream_bytes: int = 0) -> float:
    """Bytes/s a batch-1 linear layer on the CPU reads its weight at from DRAM: 8192 x 4096 matrices,
    as many as `stream_bytes` takes (the profiler gives twice the last-level cache, capped), each
    multiplied in turn, so that none is still in a cache when its turn comes. One matrix multiplied
    over and over stays in a large cache: on a 2-vCPU Xeon VM that reports 480 MB it read 32.8 GB/s,
    where a pass over opt-1.3b's decoder matrices ran at 16-20 GB/s."""
    count = max(1, -(-stream_bytes // (8192 * 4096 * torch.empty((), dtype=dtype).element_size())))
    weights = [torch.full((8192, 4096), 0.01, dtype=dtype) for _ in range(count)]  # values do not matter
    x = torch.full((1, 4096), 0.5, dtype=dtype)

    def run():
        for w in weights:
            torch.nn.functional.linear(x, w)

    with torch.inference_mode():
        per = timed(run, seconds)
    return sum(w.numel() * w.element_size() for w in weights) / per / 1e9


def cpu_attention_gbps(seconds: float = 0.25, *, batch: int = 4, heads: int = 16, ctx: int = 512,
                       head_dim: int = 64, dtype: torch.dtype = torch.bfloat16) -> float:
    """KV-cache bytes/s of one decode attention step on the CPU: the engine's own batch-invariant
    kernel over a memory part's layout (aligned [pairs, ctx, head_dim] keys and values, read in place)."""
    pairs = batch * heads
    q = torch.full((pairs, 1, head_dim), 0.1, dtype=dtype)
    k = torch.full((pairs, ctx, head_dim), 0.1, dtype=dtype)
    v = torch.full((pairs, ctx, head_dim), 0.1, dtype=dtype)
    first = torch.zeros(pairs, dtype=torch.long)
    query_pos = torch.tensor([ctx - 1])
    with torch.inference_mode():
        per = timed(lambda: attend_aligned(q, k, v, first, query_pos), seconds)
    return 2 * k.numel() * k.element_size() / per / 1e9


def dequant_gbps(device: str, dtype: torch.dtype, seconds: float = 0.25, *, group: int = 64) -> float:
    """Output bytes/s of the engine's own 4-bit group-wise decompression into reused buffers of
    opt-1.3b-sized MLP weights (8192 x 2048): where a 4-bit kernel reads the stored bytes, its
    one-pass dequantisation (prompt tokens' copy, engine.model.four_bit), else
    `compression.dequantize` as `PlacedWeights` runs it. Alternates between two outputs as the
    engine's two buffer sets do: one 2048 x 2048 output that stays in the cache measured 6.6 GB/s
    where the engine got 2.5 (fp32, AVX2)."""
    from engine.model import four_bit
    from engine.runtime.compression import dequantize, quantize

    q = quantize(torch.rand(8192, 2048, device=device), num_bits=4, group_size=group)
    outs = [torch.empty(q.shape, dtype=dtype, device=device) for _ in range(2)]
    native = four_bit.four_bit_kernel(q.shape, 4, group, dtype, torch.device(device)) in four_bit.READ_IN_PLACE

    def run():
        for out in outs:
            if native:
                four_bit.dequantized(q, dtype, lambda slot, shape, dtype, out=out: out)
            else:
                dequantize(q, dtype, out=out)
    with torch.inference_mode():
        per = timed(run, seconds, sync_for(device))
    return sum(o.numel() * o.element_size() for o in outs) / per / 1e9


def convert_gbps(dtype: torch.dtype, seconds: float = 0.25) -> float:
    """Output bytes/s of converting fp16 weights (the store's format) to the compute dtype on the
    CPU; without F16C/AVX-512 paths this is slower than the disk read it follows."""
    src = torch.full((2 ** 23,), 0.5, dtype=torch.float16)
    # Into a kept buffer, as the engine converts (placed_weights: `_stream_buffers`): timing
    # `src.to(dtype)` counted the page faults of a fresh 32 MB tensor and read 1.8 GB/s where the
    # engine's copy runs at ~10 (opt-1.3b, fp32, AVX2 host), so streamed weights looked 5x dearer.
    out = torch.empty(src.shape, dtype=dtype)
    out_bytes = out.numel() * out.element_size()
    with torch.inference_mode():
        return out_bytes / timed(lambda: out.copy_(src), seconds) / 1e9


def op_overhead_s(device: str, dtype: torch.dtype = torch.float32) -> float:
    """Per-op cost of a decode step at a tiny size: a layer's sequence of ops (LayerNorm, q/k/v/out,
    attention, LayerNorm, fc1, ReLU, fc2) at hidden 256, batch 8, divided by its op count. Run as a
    sequence, like the engine does, it includes waking the kernels' threads between ops, which on a
    busy 2-core host costs milliseconds, far more than the dispatch itself."""
    F = torch.nn.functional
    x = torch.full((8, 1, 256), 0.5, device=device, dtype=dtype)
    w = torch.full((256, 256), 0.01, device=device, dtype=dtype)
    w1 = torch.full((1024, 256), 0.01, device=device, dtype=dtype)
    w2 = torch.full((256, 1024), 0.01, device=device, dtype=dtype)
    kv = torch.full((8, 4, 64, 64), 0.1, device=device, dtype=dtype)
    ln = torch.ones(256, device=device, dtype=dtype)

    def layer():
        h = F.layer_norm(x, (256,), ln, ln)
        q, _k, _v = F.linear(h, w), F.linear(h, w), F.linear(h, w)
        a = F.scaled_dot_product_attention(q.view(8, 1, 4, 64).transpose(1, 2), kv, kv)
        h = x + F.linear(a.transpose(1, 2).reshape(8, 1, 256), w)
        return h + F.linear(F.relu(F.linear(F.layer_norm(h, (256,), ln, ln), w1)), w2)
    with torch.inference_mode():
        return timed(layer, 0.1, sync_for(device)) / 11


def pinned_copy_gbps(seconds: float = 0.25) -> tuple[float, float]:
    """Host->device and device->host GB/s with pinned host memory (the engine's staging buffers)."""
    nbytes = 256 * 2 ** 20
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    c2g = timed(lambda: dev.copy_(host, non_blocking=True), seconds, torch.cuda.synchronize)
    g2c = timed(lambda: host.copy_(dev, non_blocking=True), seconds, torch.cuda.synchronize)
    return nbytes / c2g / 1e9, nbytes / g2c / 1e9


def device_copy_gbps(seconds: float = 0.25) -> float:
    """Device memory bandwidth: a copy reads and writes each byte once."""
    nbytes = 512 * 2 ** 20
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    return 2 * nbytes / timed(lambda: b.copy_(a), seconds, torch.cuda.synchronize) / 1e9
