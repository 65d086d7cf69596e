"""Cost model of the zig-zag block schedule: time per layer and peak memory per tier.

Follows the FlexGen paper (Sheng et al. 2023, section 4.2) by idea: for one block of
B = gpu_batch_size * num_gpu_batches rows, a step (prefill, or one decode token) visits every
layer once; each layer's weights are loaded once and shared by the block's micro-batches, while
cache and activations move per micro-batch. Each resource (disk, cpu->gpu link, gpu->cpu link,
compute) is busy for a time linear in the placement fractions; with overlap a layer costs the max
of them, without it their sum. Changes from FlexLLMGen's experimental cost model:
- it works without a GPU: the compute device is then the CPU, the GPU fractions are RAM, the
  cpu<->gpu links cost nothing (the engine does the same);
- activations may live on disk; CPU attention (cpu_cache_compute) is modelled; compression
  shrinks stored and moved bytes and adds a decompression cost;
- disk reads and writes share one device, so their times add up in one "disk" term;
- compute is a roofline per micro-batch: max(FLOPs / FLOP/s, weight bytes / memory bandwidth),
  because a small-batch decode matmul streams its weights and is bound by memory, not FLOPs.

Every quantity here is a sum of fractions times constants, so the same functions evaluate floats,
numpy arrays (the brute-force grid search) and pulp expressions (the LP). Never call max()/min()
on a fraction inside this module: `resource_max` and the LP's linearised max do that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.planning.hardware import HardwareProfile
from engine.planning.calibration import model_key
from engine.model.config import OPTConfig
from engine.runtime.placement import cache_pair_split
from engine.runtime.policy import CompressionConfig, Policy

GB = 1e9
GIB = 2 ** 30
FP16 = 2  # bytes per element in the weight store (fp16), whatever the compute dtype
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def elem_bytes(hw: HardwareProfile) -> int:
    """Bytes per element of what the engine holds in memory: resident weights, cache, activations
    are kept in the compute dtype (float32 on CPUs without native bf16 doubles them)."""
    return DTYPE_BYTES.get(hw.compute_dtype, 2)
TENSORS_PER_LAYER = 16  # q/k/v/out and fc1/fc2 weights and biases, two LayerNorms: one disk read each
OPS_PER_LAYER = 12  # kernels one layer launches per micro-batch: 6 GEMMs, 2 LayerNorms, attention, ...

RESOURCES = ("disk", "cpu_to_gpu", "gpu_to_cpu", "compute")
TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True, kw_only=True)
class Placement:
    """The nine fractions (weights w, cache c, activations h on gpu g, cpu c, disk d).
    Fields may be floats, numpy arrays or pulp expressions. The weight fractions are of all the
    stored weight bytes; placement (engine.runtime.placement.split_weights) puts the lookup tables on disk
    first and the output head there last, so the decoder layers' share of the disk and what memory
    the lookup tables take follow from wg and wd (`weight_split`). The LP, which cannot clip, gives
    that split as expressions of its own."""
    wg: Any
    wc: Any
    wd: Any
    cg: Any
    cc: Any
    cd: Any
    hg: Any
    hc: Any
    hd: Any
    split: "WeightSplit | None" = None  # LP only

    @classmethod
    def from_policy(cls, policy: Policy, num_heads: int | None = None) -> "Placement":
        """With num_heads, the cache fractions the engine realises: whole (row, head) pairs per slot."""
        f = {k: p / 100.0 for k, p in zip(("wg", "wc", "cg", "cc", "hg", "hc"), policy.percents)}
        if num_heads:
            pairs = policy.gpu_batch_size * num_heads
            gpu, cpu, _ = cache_pair_split(pairs, policy.cache_gpu_percent, policy.cache_cpu_percent)
            f["cg"], f["cc"] = gpu / pairs, cpu / pairs
        return cls(wd=1.0 - f["wg"] - f["wc"], cd=1.0 - f["cg"] - f["cc"],
                   hd=1.0 - f["hg"] - f["hc"], **f)


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The discrete part of a policy plus the workload: everything that is not a fraction."""
    gpu_batch_size: int
    num_gpu_batches: int
    prompt_len: int
    gen_len: int
    compress_weight: bool = False
    compress_cache: bool = False
    cpu_cache_compute: bool = False
    overlap: bool = True
    compression: CompressionConfig = CompressionConfig()

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @classmethod
    def from_policy(cls, policy: Policy, *, prompt_len: int, gen_len: int) -> "Shape":
        return cls(gpu_batch_size=policy.gpu_batch_size, num_gpu_batches=policy.num_gpu_batches,
                   prompt_len=prompt_len, gen_len=gen_len, compress_weight=policy.compress_weight,
                   compress_cache=policy.compress_cache, cpu_cache_compute=policy.cpu_cache_compute,
                   overlap=policy.overlap, compression=policy.compression)


def compression_factor(comp: CompressionConfig) -> float:
    """Compressed bytes / fp16 bytes for group-wise quantisation (FlexGen section 5): each element
    takes num_bits, and each group of group_size elements stores a min and a scale in fp16
    (2 values * 2 bytes), so bytes = n * (bits/8 + 4/group_size) against n * 2 in fp16:
    factor = bits/16 + 2/group_size (4 bit, group 64: 0.25 + 0.03125 = 0.28125)."""
    return comp.num_bits / 16 + 2 / comp.group_size


def layer_weight_bytes(cfg: OPTConfig) -> float:
    return FP16 * cfg.layer_param_count()


def lookup_weight_bytes(cfg: OPTConfig) -> float:
    return FP16 * cfg.lookup_table_param_count()


def head_weight_bytes(cfg: OPTConfig) -> float:
    """Embedding tables and the optional 350m projections, plus the output head: tied to the token
    embedding in the checkpoint, but the engine's store keeps it as its own tensor in the "head"
    layer (so input and output ends can sit on different tiers), and that copy is held too."""
    return FP16 * (cfg.param_count() - cfg.num_layers * cfg.layer_param_count()
                   + cfg.vocab_size * cfg.embed_dim)


def _weight_kinds(cfg: OPTConfig) -> tuple[float, float, float]:
    """Stored (fp16) bytes of the lookup tables, the output head (and projections), the decoder layers."""
    lookup = lookup_weight_bytes(cfg)
    return lookup, head_weight_bytes(cfg) - lookup, cfg.num_layers * layer_weight_bytes(cfg)


def weight_shares(cfg: OPTConfig) -> tuple[float, float]:
    """The lookup tables' and the decoder layers' fractions of the stored weight bytes."""
    lookup, head, layers = _weight_kinds(cfg)
    return lookup / (lookup + head + layers), layers / (lookup + head + layers)


def max_weights_disk_fraction(cfg: OPTConfig) -> float:
    """Plans never put the output head on disk (streaming it costs as much RAM as holding it: its
    converted copy is kept), so at most the lookup tables and the decoder layers go there."""
    return sum(weight_shares(cfg))


@dataclass(frozen=True)
class WeightSplit:
    """Where each kind of weight is, for engine.runtime.placement.split_weights: the disk share holds the
    lookup tables first, then decoder layers, then the head; the decoder layers and the head share
    the GPU share (the head goes there first in the engine; here they share it evenly)."""
    layers_on_disk: Any  # fraction of the decoder layers' bytes on disk
    head_on_disk: Any
    lookup_held: Any     # fraction of the lookup tables in memory
    matmul_on_gpu: Any   # fraction of the decoder layers and head on the GPU tier


def weight_split(cfg: OPTConfig, x: Placement, *, exact: bool = False) -> WeightSplit:
    """The lookup tables go to disk whenever any weights do, a step at wd = 0: `exact` gives the
    step, otherwise its convex relaxation (the tables leave memory as the disk share grows to hold
    them). Floats and numpy arrays; the LP passes its own (Placement.split)."""
    if x.split is not None:
        return x.split
    lookup, head, layers = _weight_kinds(cfg)
    total = lookup + head + layers
    disk = x.wd * total
    held = np.where(np.asarray(x.wd) > 1e-9, 0.0, 1.0) if exact else np.clip(1.0 - disk / lookup, 0.0, 1.0)
    return WeightSplit(layers_on_disk=np.clip((disk - lookup) / layers, 0.0, 1.0),
                       head_on_disk=np.clip((disk - lookup - layers) / head, 0.0, 1.0),
                       lookup_held=held, matmul_on_gpu=np.clip(x.wg * total / (layers + head), 0.0, 1.0))


@dataclass(frozen=True)
class _Sizes:
    """Bytes per layer of the things that move, for one block (B rows) unless said otherwise."""
    w: float            # one layer's weights as held in memory (compute dtype, or compressed)
    w_disk: float       # ... as stored on and read from disk (fp16, or compressed)
    w16: float          # ... in the compute dtype (what the matmuls read)
    head: float         # output head (and 350m's projections), the same three ways
    head_disk: float
    head16: float
    lookup: float       # embedding tables: held (fp16, the rows gathered are converted) and stored
    lookup_disk: float
    kv_new_pre: float   # cache written by prefill, per layer, as stored
    kv_dec: float       # cache read by one decode step, per layer (average context), as stored
    kv_dec16: float     # the same in fp16 (what attention reads)
    kv_tok: float       # cache appended per decode step, per layer, as stored
    kv_total: float     # whole cache of the block, all layers, at full length, as stored
    kv_mb_full: float   # one micro-batch's cache of one layer at full length, as stored
    kv_mb_full16: float
    act_pre: float      # hidden states of the block between two layers, prefill
    act_dec: float


def _sizes(cfg: OPTConfig, sh: Shape, hw: HardwareProfile) -> _Sizes:
    B, b, s, n, h = sh.block_size, sh.gpu_batch_size, sh.prompt_len, sh.gen_len, cfg.hidden_size
    wf = compression_factor(sh.compression) if sh.compress_weight else 1.0
    cf = compression_factor(sh.compression) if sh.compress_cache else 1.0
    ctx_avg = s + n / 2  # decode reads a context growing from s to s+n (FlexGen's s + n/2)
    el = elem_bytes(hw)
    kv_row_tok = 2 * h * el  # k and v of one token of one row, one layer
    lw, lk = layer_weight_bytes(cfg), lookup_weight_bytes(cfg)  # fp16 bytes
    hd = head_weight_bytes(cfg) - lk
    held = (lambda fp16: fp16 * wf) if sh.compress_weight else (lambda fp16: fp16 / FP16 * el)
    return _Sizes(
        w=held(lw), w_disk=lw * wf, w16=lw / FP16 * el,
        head=held(hd), head_disk=hd * wf, head16=hd / FP16 * el,
        lookup=lk * wf, lookup_disk=lk * wf,
        kv_new_pre=B * s * kv_row_tok * cf,
        kv_dec=B * ctx_avg * kv_row_tok * cf, kv_dec16=B * ctx_avg * kv_row_tok,
        kv_tok=B * kv_row_tok * cf,
        kv_total=cfg.num_layers * B * (s + n) * kv_row_tok * cf,
        kv_mb_full=b * (s + n) * kv_row_tok * cf, kv_mb_full16=b * (s + n) * kv_row_tok,
        act_pre=B * s * h * el, act_dec=B * h * el,
    )


def _compute_bw(hw: HardwareProfile) -> float:
    return (hw.gpu_mem_gbps if hw.has_gpu else hw.cpu_mem_gbps) * GB


def _matmul_time(hw: HardwareProfile, flops: float, weight_bytes: float, *, rows: float, calls: int) -> float:
    """`calls` linear layers of `rows` input rows over `weight_bytes` (compute dtype) each, `flops` in
    all: the profile's measured table where there is one, else the roofline (the slower of doing
    the FLOPs and streaming the weights from device memory)."""
    measured = hw.linear_seconds(rows, weight_bytes)
    if measured is not None:
        return calls * measured
    return max(flops / hw.flops(), calls * weight_bytes / _compute_bw(hw))


def phase_terms(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
                decode: bool) -> list[tuple[int, dict[str, Any]]]:
    """Busy time (s) of each resource for one step of the block, as [(count, {resource: time})]:
    the decoder layer (count = num_layers) and the embedding/output head (count 1)."""
    z = _sizes(cfg, sh, hw)
    B, b, nb, s, h = sh.block_size, sh.gpu_batch_size, sh.num_gpu_batches, sh.prompt_len, cfg.hidden_size
    gpu = hw.has_gpu
    # The lookup tables on disk are read by rows (a decode step: one per sequence), not charged.
    ws = weight_split(cfg, x)
    wd_layers, wd_head = ws.layers_on_disk, ws.head_on_disk
    rd, wr = 1.0 / (hw.disk_read_gbps * GB), 1.0 / (hw.disk_write_gbps * GB)
    c2g = 1.0 / (hw.cpu_to_gpu_gbps * GB) if gpu else 0.0  # no link without a GPU: RAM is RAM
    g2c = 1.0 / (hw.gpu_to_cpu_gbps * GB) if gpu else 0.0
    deq = 1.0 / (hw.dequant_gbps * GB)
    cpu_attn = sh.cpu_cache_compute and gpu  # without a GPU all attention is on the CPU anyway
    tokens = 1 if decode else s
    act = z.act_dec if decode else z.act_pre

    # Weights: loaded once per layer per step and shared by the block (the point of the zig-zag).
    # The store is fp16; a bf16/fp32 engine converts what it streams from disk on the I/O thread.
    # Without a GPU that conversion runs on the cores that compute, so it adds to compute rather
    # than overlapping with it (the disk read itself is DMA and does overlap).
    convert = 1.0 / (hw.convert_gbps * GB) if hw.convert_gbps and hw.compute_dtype != "float16" else 0.0
    convert_s = 0.0 if sh.compress_weight else z.w16 * wd_layers * convert
    disk = z.w_disk * wd_layers * rd + (convert_s if gpu else 0.0)
    c_to_g = z.w * (1 - ws.matmul_on_gpu) * c2g
    # Activations: each layer loads its input from and stores its output to their tier.
    disk = disk + act * x.hd * (rd + wr)
    c_to_g = c_to_g + act * (x.hc + x.hd) * c2g
    g_to_c = act * (x.hc + x.hd) * g2c

    dense_flops = 2 * B * tokens * (cfg.layer_param_count())
    compute = (_matmul_time(hw, dense_flops, z.w16, rows=b * tokens, calls=nb)
               + nb * OPS_PER_LAYER * hw.op_overhead_s + (0.0 if gpu else convert_s))
    if not decode:
        # Prefill: attention scores over s x s on the compute device; the new cache is stored.
        compute = compute + 4 * B * s * s * h / hw.flops()
        g_to_c = g_to_c + z.kv_new_pre * (x.cc + x.cd) * g2c
        disk = disk + z.kv_new_pre * x.cd * wr
        if sh.compress_cache:
            compute = compute + (z.kv_new_pre / compression_factor(sh.compression)) * deq
    else:
        disk = disk + z.kv_dec * x.cd * rd + z.kv_tok * x.cd * wr
        g_to_c = g_to_c + z.kv_tok * (x.cc + x.cd) * g2c
        if cpu_attn:
            # The CPU attends over its share (and the disk share, read into RAM): only the query
            # goes down and the attention output comes back up.
            compute = compute + z.kv_dec16 * x.cg / _compute_bw(hw) \
                + z.kv_dec16 * (x.cc + x.cd) / (hw.cpu_attention_gbps * GB)
            g_to_c = g_to_c + B * h * elem_bytes(hw) * (x.cc + x.cd) * g2c
            c_to_g = c_to_g + B * h * elem_bytes(hw) * (x.cc + x.cd) * c2g
        else:
            c_to_g = c_to_g + z.kv_dec * (x.cc + x.cd) * c2g
            attn_bw = hw.gpu_mem_gbps if gpu else hw.cpu_attention_gbps
            compute = compute + z.kv_dec16 / (attn_bw * GB)
        if sh.compress_cache:
            compute = compute + z.kv_dec16 * deq

    # The engine's whole layer against the sum of its kernels (measured by the profiler).
    compute = compute * hw.scale_for(model_key(cfg), "decode" if decode else "prefill", b)
    if sh.compress_weight:
        compute = compute + z.w16 * deq

    # Per-request disk latency (linear stand-in for "one request per tensor / micro-batch when any
    # of it is on disk"): it dominates when small tensors or one-token cache appends go to disk.
    r_lat, w_lat = hw.disk_read_latency_s, hw.disk_sync_latency_s
    disk = disk + TENSORS_PER_LAYER * wd_layers * r_lat + nb * x.hd * (r_lat + w_lat)
    disk = disk + nb * x.cd * (w_lat + (r_lat if decode else 0.0))
    layer = {"disk": disk, "cpu_to_gpu": c_to_g, "gpu_to_cpu": g_to_c, "compute": compute}

    # Head: the output head (one position per row), loaded once per step.
    head_compute = _matmul_time(hw, 2 * B * cfg.embed_dim * cfg.vocab_size, z.head16, rows=b, calls=nb) \
        + nb * 3 * hw.op_overhead_s  # final LayerNorm, LM head, sampling
    head_compute = head_compute * hw.scale_for(model_key(cfg), "head", b)
    if sh.compress_weight:
        head_compute = head_compute + z.head16 * deq
    head_convert_s = 0.0 if sh.compress_weight else z.head16 * wd_head * convert
    head = {"disk": z.head_disk * wd_head * rd + (head_convert_s if gpu else 0.0),
            "cpu_to_gpu": z.head * (1 - ws.matmul_on_gpu) * c2g,
            "gpu_to_cpu": 0.0 * x.wd, "compute": head_compute + (0.0 if gpu else head_convert_s) + 0.0 * x.wd}
    if not gpu:  # the I/O thread runs on the cores that compute: overlap is not free
        for stage in (layer, head):
            stage["compute"] = stage["compute"] + hw.io_compute_interference * stage["disk"]
    return [(cfg.num_layers, layer), (1, head)]


def memory_peaks(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
                 exact: bool = False) -> dict[str, list[Any]]:
    """Peak bytes per tier, as a list of candidates per tier (the peak is their max: one per phase).
    Home: what lives on the tier for the whole run. Working: double buffers for what streams in,
    decompressed copies, and the largest intermediate of one micro-batch.

    The engine moves activations by whole (layer, micro-batch) slots, so any slot on disk needs
    full-slot staging buffers. That is a step, not linear in the disk fraction: the LP uses the
    linear relaxation (staging x fraction, optimistic), `exact` (floats only) the step; the planner
    re-solves with a tighter budget when the exact figure does not fit. The cache is split inside
    every slot (placement.cache_pair_split), so its staging is linear in the disk fraction."""
    z = _sizes(cfg, sh, hw)
    ws = weight_split(cfg, x, exact=exact)
    wd_layers, wd_head, lookup_held = ws.layers_on_disk, ws.head_on_disk, ws.lookup_held
    if exact:  # floats or numpy arrays
        x_hd = np.where(np.asarray(x.hd) > 1e-9, 1.0, 0.0)
        # Streamed decoder layers: converted copies kept for two layers (the one computing, the
        # one read ahead) and raw read buffers for one; a streamed head: its converted copy and
        # its raw read. Lookup tables on disk need only the rows they gather.
        w_staging = (np.where(np.asarray(wd_layers) > 1e-9, 2 * z.w + z.w_disk, 0.0)
                     + np.where(np.asarray(wd_head) > 1e-9, z.head + z.head_disk, 0.0))
    else:
        x_hd = x.hd
        w_staging = 2 * z.w * wd_layers
    b, s, n, h, f, nh = (sh.gpu_batch_size, sh.prompt_len, sh.gen_len, cfg.hidden_size, cfg.ffn_dim,
                         cfg.num_heads)
    on_gpu = ws.matmul_on_gpu * (cfg.num_layers * z.w + z.head)
    # What memory (GPU and RAM together) holds of them.
    held = cfg.num_layers * z.w * (1 - wd_layers) + z.head * (1 - wd_head) + z.lookup * lookup_held
    el = elem_bytes(hw)
    act_mb_pre, act_mb_dec = b * s * h * el, b * h * el
    # Largest live intermediates of one micro-batch: attention (q,k,v + scores + probs) or MLP.
    inter_pre = el * b * (max(3 * s * h + 2 * nh * s * s, s * f + s * h) + s * h)
    # ... and never below what the engine's own budget check counts (engine.runtime.budgets), which a
    # planned policy must pass: q/k/v/out and the MLP's intermediate, the mask, logits twice.
    inter_pre = max(inter_pre, el * b * s * (4 * h + f) + b * s * (s + n) + 8 * b * cfg.vocab_size)
    inter_dec = el * b * (max(3 * h + 2 * nh * (s + n), f + h) + h) + 4 * b * cfg.vocab_size
    # Dequantised copies are made into buffers the engine keeps: two decoder layers' (alternating)
    # and the output head's (the embedding table dequantises only the rows it gathers).
    w_work16 = 2 * z.w16 + z.head16 if sh.compress_weight else 0.0
    kv_work16 = z.kv_mb_full16 if sh.compress_cache else 0.0
    disk_peak = (cfg.num_layers * z.w_disk * wd_layers + z.head_disk * wd_head + z.lookup_disk * (1 - lookup_held)
                 + x.cd * z.kv_total + x.hd * z.act_pre)

    if not hw.has_gpu:
        # One memory holds the "gpu" and "cpu" shares; weights resident in RAM are used in place,
        # only what comes from disk needs double buffers.
        def ram(act: float, act_mb: float, inter: float, decode: bool) -> Any:
            home = held + (x.cg + x.cc) * z.kv_total + (x.hg + x.hc) * act
            work = w_staging + w_work16 + 2 * act_mb * x_hd + inter
            if decode:  # a slot read ahead, the one in use, and it with the new position appended
                work = work + 3 * z.kv_mb_full * x.cd + kv_work16
            return home + work
        return {"gpu": [], "cpu": [ram(z.act_pre, act_mb_pre, inter_pre, False),
                                    ram(z.act_dec, act_mb_dec, inter_dec, True)],
                "disk": [disk_peak]}

    cpu_attn = sh.cpu_cache_compute
    def gpu_peak(act: float, act_mb: float, inter: float, decode: bool) -> Any:
        home = on_gpu + x.cg * z.kv_total + x.hg * act
        work = 2 * z.w * (1 - x.wg) + w_work16 + 2 * act_mb * (1 - x.hg) + inter
        if decode:
            moved = x.cg * 0.0 + (0.0 if cpu_attn else 1.0) * (x.cc + x.cd)
            work = work + 2 * z.kv_mb_full * moved + kv_work16
        else:
            work = work + 2 * (z.kv_mb_full * s / (s + n)) * (1 - x.cg)  # new cache waiting to be stored
        return home + work

    def cpu_peak(act: float, act_mb: float, decode: bool) -> Any:
        home = held - on_gpu + x.cc * z.kv_total + x.hc * act
        work = w_staging + 2 * act_mb * x_hd  # staging buffers for what comes from disk
        if decode:
            work = work + 3 * z.kv_mb_full * x.cd
            if cpu_attn:  # scores of one micro-batch in fp32 on the CPU
                work = work + 4 * b * nh * (s + n) + kv_work16
        return home + work

    return {"gpu": [gpu_peak(z.act_pre, act_mb_pre, inter_pre, False),
                    gpu_peak(z.act_dec, act_mb_dec, inter_dec, True)],
            "cpu": [cpu_peak(z.act_pre, act_mb_pre, False), cpu_peak(z.act_dec, act_mb_dec, True)],
            "disk": [disk_peak]}


def resource_max(terms: dict[str, Any], overlap: bool) -> Any:
    """Time of one stage: the busiest resource with overlap, the sum of all without."""
    values = list(terms.values())
    if not overlap:
        return sum(values[1:], values[0])
    out = values[0]
    for v in values[1:]:
        out = np.maximum(out, v)
    return out


@dataclass(frozen=True, kw_only=True)
class Estimate:
    tokens_per_s: float
    total_s: float          # one block: prefill + (gen_len - 1) decode steps
    prefill_s: float
    decode_step_s: float
    peak_gib: dict[str, float]
    bottleneck: str         # the busiest resource of a decode layer
    decode_terms_s: dict[str, float]  # per-resource busy time of one decode step (all stages)

    def fits(self, budgets_gib: dict[str, float | None], tol: float = 1e-6) -> bool:
        return all(lim is None or self.peak_gib[t] <= lim * (1 + tol) + 1e-9
                   for t, lim in budgets_gib.items())


def step_time(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *, decode: bool) -> Any:
    total = 0.0
    for count, terms in phase_terms(cfg, hw, sh, x, decode=decode):
        total = total + count * resource_max(terms, sh.overlap)
    return total


def block_time(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement) -> Any:
    """Seconds for one block: prefill (yields the first token) then gen_len - 1 decode steps."""
    return step_time(cfg, hw, sh, x, decode=False) + (sh.gen_len - 1) * step_time(cfg, hw, sh, x, decode=True)


def peak_bytes(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, x: Placement, *,
               exact: bool = False) -> dict[str, Any]:
    out = {}
    for tier, cands in memory_peaks(cfg, hw, sh, x, exact=exact).items():
        out[tier] = resource_max({str(i): c for i, c in enumerate(cands)}, True) if cands else 0.0
    return out


def estimate(cfg: OPTConfig, hw: HardwareProfile, policy: Policy, *, prompt_len: int,
             gen_len: int) -> Estimate:
    """Predicted throughput and peak memory of a concrete policy (floats)."""
    sh = Shape.from_policy(policy, prompt_len=prompt_len, gen_len=gen_len)
    x = Placement.from_policy(policy, cfg.num_heads)
    pre = float(step_time(cfg, hw, sh, x, decode=False))
    dec = float(step_time(cfg, hw, sh, x, decode=True))
    total = pre + (gen_len - 1) * dec
    busy = {r: 0.0 for r in RESOURCES}
    for count, terms in phase_terms(cfg, hw, sh, x, decode=True):
        for r in RESOURCES:
            busy[r] += count * float(terms[r])
    return Estimate(
        tokens_per_s=sh.block_size * gen_len / total, total_s=total, prefill_s=pre, decode_step_s=dec,
        peak_gib={t: float(v) / GIB for t, v in peak_bytes(cfg, hw, sh, x, exact=True).items()},
        bottleneck=max(busy, key=busy.get), decode_terms_s=busy)


def traffic_per_token(cfg: OPTConfig, hw: HardwareProfile, policy: Policy, *, prompt_len: int,
                      gen_len: int) -> dict[str, float]:
    """Bytes each link moves per generated token (whole run), for comparing policies by traffic."""
    slow = hw.replace(disk_read_gbps=1 / GB, disk_write_gbps=1e30, cpu_to_gpu_gbps=1e30,
                      gpu_to_cpu_gbps=1e30)
    sh = Shape.from_policy(policy, prompt_len=prompt_len, gen_len=gen_len)
    x = Placement.from_policy(policy, cfg.num_heads)
    # With a read bandwidth of 1 byte/s the disk term is the bytes read (writes cost ~0).
    read = 0.0
    for decode, times in ((False, 1), (True, gen_len - 1)):
        for count, terms in phase_terms(cfg, slow, sh, x, decode=decode):
            read += times * count * float(terms["disk"])
    return {"disk_read": read / (sh.block_size * gen_len)}
