"""Calibrate the cost model's compute term against the engine's own decoder layer and head.

The profile's kernel figures (a linear layer's time per weight byte, attention bandwidth, op
dispatch) are each measured alone, on one weight shape. A real layer also runs LayerNorms, ReLU,
residual adds, the cache append and allocations between them, and it allocates its multi-MB
intermediates fresh (under the engine's allocator setting for a tight budget, so each costs page
faults); and a small-batch matmul's speed depends on the weight's shape (fp32 on an AVX2 host: 17
to 66 GFLOP/s at 32 rows for the two MLP shapes of opt-1.3b). So the profiler times
`engine.model.opt` itself, for a prefill micro-batch and decode micro-batches of several sizes,
and the output head, and stores measured / predicted (`HardwareProfile.compute_scale`, on an
opt-1.3b-sized layer), which the cost model applies to every layer's compute. A model that is
planned on this host gets the same measured at its own dimensions (`model_compute_scale`).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import psutil
import torch

from engine.model.checkpoint import layer_tensor_specs
from engine.model.families import family_math
from engine.model.attention import attend_aligned
from engine.model.kernels import pack_for_cpu
from engine.model.config import layer_tensor_shapes, preset
from engine.planning.cost_inputs import Placement, Shape
from engine.planning.cost_time import phase_terms
from engine.planning.hardware import PREFILL_KEPT, HardwareProfile
from engine.runtime.budgets import KEEP_FREED_THRESHOLD, configure_allocator
from engine.runtime.kv_cache import AlignedPairs
from engine.runtime.policy import Policy

PREFILL_ROWS, PROMPT_LEN = 8, 128      # the reference prefill micro-batch: 1024 tokens
PREFILL_ROW_COUNTS = (2, 8, 32)  # prefill micro-batch sizes timed (log-interpolated by tokens between)
PREFILL_POINT_MAX_S = 1.0  # a larger prefill micro-batch is timed only where its call is predicted shorter
DECODE_ROWS, GEN_LEN = 32, 16           # one decode step attends over prompt + gen/2 = 136 positions
DECODE_ROW_COUNTS = (1, 8, 32, 64)  # decode micro-batch sizes timed (log-interpolated between)
MAX_EVICTION_BYTES = 1 << 30
ROUNDS = 3


def _layer_weights(cfg, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return _as_resident({name: _random(shape, device, dtype) for name, shape in layer_tensor_shapes(cfg)})


def _random(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Values do not matter for timing, but the call-size checks that the first calls run
    (engine.model.kernels) are remembered for the shape: on a matrix of one repeated value every
    call size gives the same bits, so such a matrix would pass sizes that real weights fail."""
    gen = torch.Generator(device=device).manual_seed(math.prod(shape))
    return (torch.randn(shape, generator=gen, device=device, dtype=dtype) * 0.02)


def _as_resident(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A decoder layer's matrices as the engine holds those that stay in RAM on a CPU (packed once,
    engine.model.packed_weight): a compute-bound run is one whose weights stay there."""
    return {name: pack_for_cpu(t) for name, t in weights.items()}  # vectors come back as they are


def _layer_step(cfg, w, h: torch.Tensor, cache: AlignedPairs, start: int) -> torch.Tensor:
    """What the schedule runs for one micro-batch in one layer (cache in RAM): q/k/v, append to the
    cache's aligned keys and values (a prefill's straight from the projections' layout, as
    schedule._attend_step does), attend over them in place, output projection and MLP."""
    layers, s = family_math(cfg), h.shape[1]
    positions = torch.arange(start, start + s, device=h.device).expand(h.shape[0], s)
    prompt = start == 0  # a prefill's tokens are prompt tokens, a decode step's generated ones
    q, k, v = layers.qkv(w, cfg, h, positions, prompt)
    if prompt:  # a prefill writes straight from the projections' layout (kv_cache.AlignedPairs.write_heads)
        cache.write_heads(start, k, v, 0)
    else:
        rows = layers.cache_rows(k, v)
        cache.write(start, rows.reshape(s, 2, -1, cfg.head_dim))  # (row, KV head) pairs
    q_pairs = layers.to_pairs(cfg, q)
    query_pos = torch.arange(start, start + s, device=h.device).repeat(q_pairs.shape[1] // s)
    attn = layers.from_pairs(cfg, attend_aligned(q_pairs, cache.keys, cache.values, cache.first, query_pos))
    return layers.mlp(w, cfg, layers.attention_output(w, cfg, h, attn, prompt), prompt)


def calibration_bytes(cfg, dtype: torch.dtype, device: str = "cpu") -> int:
    """Memory one calibration needs: a layer's and the output head's weights in `dtype`, and on a
    CPU the buffer that evicts them from its caches (`_evictor`)."""
    size = torch.empty((), dtype=dtype).element_size()
    layer = sum(math.prod(shape) for _, shape in layer_tensor_shapes(cfg))
    return size * (layer + cfg.vocab_size * cfg.embed_dim) + (eviction_bytes() if device == "cpu" else 0)


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports for CPU 0 (0 where it reports none)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError):
            continue
    return largest


def eviction_bytes() -> int:
    """Twice the last-level cache, at most MAX_EVICTION_BYTES and a tenth of the available RAM."""
    return min(2 * last_level_cache_bytes(), MAX_EVICTION_BYTES, psutil.virtual_memory().available // 10)


def _evictor(device: torch.device):
    """A pass over a buffer of `eviction_bytes` (twice the last-level cache, capped), run before each
    timed decode call on a CPU: the engine's decode step reads every layer's weights and cache from
    DRAM (opt-1.3b's 24 layers are 2.4 GB in bfloat16), where one layer timed over and over stays
    in a large cache (a 2-vCPU Xeon VM reports 480 MB: a layer's six 32-row linear calls took 7.9 ms
    repeated on one layer's matrices against 10.4 ms over 12 layers' in turn). None elsewhere."""
    nbytes = eviction_bytes() // 4 * 4
    if device.type != "cpu" or nbytes == 0:
        return None
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    return lambda: buffer.sum()


def _predicted(cfg, hw: HardwareProfile, phase: str, rows: int, part: str) -> float:
    """The cost model's compute time of one layer (part "layer") or the head ("head"), unscaled."""
    policy = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=rows)
    sh = Shape.from_policy(policy, prompt_len=PROMPT_LEN, gen_len=GEN_LEN)
    unscaled = dataclasses.replace(hw, compute_scale={}, model_compute_scale={})
    (_, layer), (_, head) = phase_terms(cfg, unscaled, sh, Placement.from_policy(policy), decode=phase != "prefill")
    return float((layer if part == "layer" else head)["compute"])


def measure_compute_scale(hw: HardwareProfile, device: str, dtype: torch.dtype, timed,
                          cfg=None) -> dict[str, float]:
    """Measured / predicted compute time of the engine's own code on `device`, for `cfg`'s
    dimensions (default: opt-1.3b's): "prefill:T" per prefill micro-batch of T tokens (PROMPT_LEN
    tokens a row, PREFILL_ROW_COUNTS rows, those whose call `prefill_row_counts` expects to be
    short), its intermediates faulted in anew as under a tight budget, and PREFILL_KEPT ":T" (the
    same with the allocator keeping freed blocks, as where the budget has room:
    engine.runtime.budgets): one layer's call at 1024 tokens ran at 0.57 of the kernels' sum where a
    whole engine's 4096-token ones ran at 1.3 (opt-6.7b), so one size does not scale to all;
    "prefill" and PREFILL_KEPT alone are the PREFILL_ROWS figures; "decode" (DECODE_ROWS), and, per
    row count of a decode micro-batch, "decode:R" and "head:R"
    (the final LayerNorm and the output head over R rows: a vocabulary-wide matmul whose speed at
    small R the generic linear table, timed on one shape, misses by up to 2x).
    `timed(fn, before)` returns the seconds per call of fn, `before` run untimed ahead of each (None:
    nothing): the profiler passes its median call, not its fastest,
    because the engine runs layer after layer for minutes and sees the host as it is, not at its
    best (2-vCPU Zen4, bf16, 8 rows: the fastest of one layer's calls gave a decode step 1.5x
    faster than the engine's, where 24 calls in a row averaged within 10 % of it). Every point is
    timed in ROUNDS rounds over all points and the median round counts: a neighbour's burst of a
    few seconds on a shared host (seen: one point 2x off) then spoils one round, not the figure."""
    cfg = dataclasses.replace(cfg or preset("1.3b"), num_layers=1)
    dev = torch.device(device)
    w, head = _layer_weights(cfg, dev, dtype), _head_weights(cfg, dev, dtype)
    evict = _evictor(dev)
    prefill_rows = prefill_row_counts(cfg, hw)
    rounds = []
    for _ in range(ROUNDS):
        configure_allocator()  # a tight budget's setting: big intermediates cost page faults there
        points = _time_points(cfg, w, head, timed, evict, prefill_rows)
        configure_allocator(KEEP_FREED_THRESHOLD)  # a budget with room: freed intermediates are reused
        points.update({f"{PREFILL_KEPT}:{rows * PROMPT_LEN}": _time_prefill(cfg, w, timed, rows)
                       for rows in prefill_rows})
        rounds.append(points)
    configure_allocator()
    measured = {point: statistics.median(r[point] for r in rounds) for point in rounds[0]}
    scale = {}
    for rows in prefill_rows:
        tokens, predicted = rows * PROMPT_LEN, _predicted(cfg, hw, "prefill", rows, "layer")
        scale[f"prefill:{tokens}"] = measured[f"prefill:{tokens}"] / predicted
        # Keeping freed blocks only saves page faults: a kept call timed slower than a faulting one
        # is the host's noise (seen on a shared VM: one 4096-token point 1.69x the kernels' sum
        # kept, 1.39x faulting; a run minutes later 1.20x and 1.27x), so it is held to the latter.
        scale[f"{PREFILL_KEPT}:{tokens}"] = min(measured[f"{PREFILL_KEPT}:{tokens}"], measured[f"prefill:{tokens}"]) / predicted
    for part in ("prefill", PREFILL_KEPT):
        scale[part] = scale[f"{part}:{PREFILL_ROWS * PROMPT_LEN}"]
    for rows in DECODE_ROW_COUNTS:
        scale[f"decode:{rows}"] = measured[f"decode:{rows}"] / _predicted(cfg, hw, "decode", rows, "layer")
        scale[f"head:{rows}"] = measured[f"head:{rows}"] / _predicted(cfg, hw, "decode", rows, "head")
    scale["decode"] = scale[f"decode:{DECODE_ROWS}"]
    return scale


def prefill_row_counts(cfg, hw: HardwareProfile) -> tuple[int, ...]:
    """The PREFILL_ROW_COUNTS timed for `cfg` on `hw`: PREFILL_ROWS always, the others where the
    kernels' sum predicts a layer's call under PREFILL_POINT_MAX_S (a 32-row call of opt-6.7b in
    float32 on two AVX2 cores would take ~10 s, times calls and rounds)."""
    return tuple(rows for rows in PREFILL_ROW_COUNTS if rows == PREFILL_ROWS
                 or _predicted(cfg, hw, "prefill", rows, "layer") <= PREFILL_POINT_MAX_S)


def _time_points(cfg, w: dict, head: dict, timed, evict, prefill_rows: tuple[int, ...]) -> dict[str, float]:
    """Seconds per call of prefill micro-batches ("prefill:T", T tokens), decode micro-batches and the
    head, once each; each decode and head call after `evict` (untimed), as the engine reads them
    from DRAM."""
    dev, dtype = next(iter(w.values())).device, next(iter(w.values())).dtype
    hid, total = cfg.hidden_size, PROMPT_LEN + GEN_LEN
    out = {f"prefill:{rows * PROMPT_LEN}": _time_prefill(cfg, w, timed, rows) for rows in prefill_rows}
    with torch.inference_mode():
        context = PROMPT_LEN + GEN_LEN // 2
        for rows in DECODE_ROW_COUNTS:
            x = torch.full((rows, 1, hid), 0.1, device=dev, dtype=dtype)
            cache = _cache(cfg, rows, total, dev, dtype)
            cache.keys[:, :context].fill_(0.1)
            cache.values[:, :context].fill_(0.1)
            out[f"decode:{rows}"] = timed(lambda: _layer_step(cfg, w, x, cache, context), evict)
        for rows in DECODE_ROW_COUNTS:
            x = torch.full((rows, hid), 0.1, device=dev, dtype=dtype)
            out[f"head:{rows}"] = timed(lambda: family_math(cfg).output_logits(head, cfg, x), evict)
    return out


def _time_prefill(cfg, w: dict, timed, rows: int) -> float:
    """Seconds per call of one prefill micro-batch (`rows` x PROMPT_LEN) in one layer."""
    dev, dtype = next(iter(w.values())).device, next(iter(w.values())).dtype
    with torch.inference_mode():
        x = torch.full((rows, PROMPT_LEN, cfg.hidden_size), 0.1, device=dev, dtype=dtype)
        cache = _cache(cfg, rows, PROMPT_LEN + GEN_LEN, dev, dtype)
        return timed(lambda: _layer_step(cfg, w, x, cache, 0))


def _cache(cfg, rows: int, max_len: int, device: torch.device, dtype: torch.dtype) -> AlignedPairs:
    pairs = rows * cfg.num_kv_heads
    return AlignedPairs(torch.zeros(pairs, dtype=torch.long), max_len, cfg.head_dim, dtype, device, pin=False)


def _head_weights(cfg, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: _random(shape, device, dtype)
            for name, shape in layer_tensor_specs(cfg, "head")}  # the engine keeps the head plain
