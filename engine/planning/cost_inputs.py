"""What the cost model reasons about: the nine placement fractions, the policy's discrete shape, and
the bytes per layer of everything that is stored, held or moved (engine.planning.cost_model).

Every quantity is a sum of fractions times constants, so the same functions evaluate floats, numpy
arrays (the brute-force grid search) and pulp expressions (the LP). Never call max()/min() on a
fraction here: `cost_time.resource_max` and the LP's linearised max do that.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.model.config import OPTConfig
from engine.model.kernel_shapes import key_capacity
from engine.planning.hardware import HardwareProfile
from engine.runtime.budgets import StoreLayout, four_bit_prompt_copy_bytes
from engine.runtime.devices import DTYPE_BYTES, torch_dtype
from engine.runtime.placement import cache_pair_split
from engine.runtime.policy import CompressionConfig, Policy
from engine.runtime.weight_tiers import ROW_LOOKUP_TABLES, kernel_of

GB = 1e9
GIB = 2 ** 30
FP16 = 2  # bytes per element in the weight store (fp16), whatever the compute dtype
def elem_bytes(hw: HardwareProfile) -> int:
    """Bytes per element of what the engine holds in memory: resident weights, cache, activations
    are kept in the compute dtype (float32 on CPUs without native bf16 doubles them)."""
    return DTYPE_BYTES.get(hw.compute_dtype, 2)


TENSORS_PER_LAYER = 16  # q/k/v/out and fc1/fc2 weights and biases, two LayerNorms: one disk read each
OPS_PER_LAYER = 12  # kernels one layer launches per micro-batch: 6 GEMMs, 2 LayerNorms, attention, ...
# Ops the compute thread runs per decode step for a micro-batch's cache slot that has a part on disk,
# whatever its size: that part's own attention call, taking its read buffer, encoding the new
# position, the copy into the buffer and the join of the parts' outputs (8x4 blocks of opt-1.3b, 1 %
# of the cache on disk: 0.076 s a step more than all in RAM over 96 slots, at 19 us an op: 40).
CACHE_DISK_PART_OPS = 40



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
    # 1 where a cache slot has a part on disk, else 0; None: whether cd > 0. The LP, which cannot
    # express a cost that steps at cd > 0, solves once with it 0 (cd = 0) and once with it 1.
    cache_disk_part: Any = None

    @property
    def has_cache_disk_part(self) -> Any:
        if self.cache_disk_part is not None:
            return self.cache_disk_part
        on_disk = np.asarray(self.cd) > 1e-9
        return float(on_disk) if on_disk.ndim == 0 else on_disk.astype(float)

    @classmethod
    def from_policy(cls, policy: Policy, num_heads: int | None = None) -> "Placement":
        """With num_heads (the KV heads), the cache fractions the engine realises: whole (row, KV head)
        pairs per slot."""
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
    # Whether the CPU budget leaves the allocator room to keep a prefill's freed intermediates
    # (engine.runtime.budgets.freed_bytes_to_keep); where it does not, each is faulted in anew in
    # every layer, and the prefill is priced at the calibration's faulting rate.
    keeps_freed_blocks: bool = False

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
    tied_copy = cfg.vocab_size * cfg.embed_dim if cfg.tie_word_embeddings else 0  # untied: counted already
    return FP16 * (cfg.param_count() - cfg.num_layers * cfg.layer_param_count() + tied_copy)


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
class Sizes:
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
    kv_dec16: float     # the same in the compute dtype
    kv_att16: float     # what a decode step's attention on a CPU reads: every context rounded up to KEY_ALIGN
    kv_tok: float       # cache appended per decode step, per layer, as stored
    kv_total: float     # whole cache of the block, all layers, at full length, as stored
    kv_mb_full: float   # one micro-batch's cache of one layer at full length, as stored
    kv_mb_full16: float
    act_pre: float      # hidden states of the block between two layers, prefill
    act_dec: float


@functools.cache
def mean_keys_attended(prompt_len: int, gen_len: int) -> float:
    """Keys per pair a decode step's attention reads, averaged over the decode steps: the context
    (prompt + tokens so far) rounded up to KEY_ALIGN (engine.model.attention.attend_aligned)."""
    steps = [key_capacity(prompt_len + i) for i in range(1, max(gen_len, 2))]
    return sum(steps) / len(steps)


def sizes(cfg: OPTConfig, sh: Shape, hw: HardwareProfile) -> Sizes:
    B, b, s, n, h = sh.block_size, sh.gpu_batch_size, sh.prompt_len, sh.gen_len, cfg.hidden_size
    wf = compression_factor(sh.compression) if sh.compress_weight else 1.0
    cf = compression_factor(sh.compression) if sh.compress_cache else 1.0
    ctx_avg = s + n / 2  # decode reads a context growing from s to s+n (FlexGen's s + n/2)
    el = elem_bytes(hw)
    kv_row_tok = 2 * cfg.num_kv_heads * cfg.head_dim * el  # k and v of one token of one row, one layer (KV heads only)
    lw, lk = layer_weight_bytes(cfg), lookup_weight_bytes(cfg)  # fp16 bytes
    hd = head_weight_bytes(cfg) - lk
    held = (lambda fp16: fp16 * wf) if sh.compress_weight else (lambda fp16: fp16 / FP16 * el)
    return Sizes(
        w=held(lw), w_disk=lw * wf, w16=lw / FP16 * el,
        head=held(hd), head_disk=hd * wf, head16=hd / FP16 * el,
        lookup=lk * wf, lookup_disk=lk * wf,
        kv_new_pre=B * s * kv_row_tok * cf,
        kv_dec=B * ctx_avg * kv_row_tok * cf, kv_dec16=B * ctx_avg * kv_row_tok,
        kv_att16=B * mean_keys_attended(s, n) * kv_row_tok,
        kv_tok=B * kv_row_tok * cf,
        kv_total=cfg.num_layers * B * (s + n) * kv_row_tok * cf,
        kv_mb_full=b * (s + n) * kv_row_tok * cf, kv_mb_full16=b * (s + n) * kv_row_tok,
        act_pre=B * s * h * el, act_dec=B * h * el,
    )


def four_bit_prompt_copy(cfg: OPTConfig, sh: Shape, hw: HardwareProfile) -> int | None:
    """Where a kernel multiplies every 4-bit matrix as it is stored (engine.runtime.weight_tiers.kernel_of),
    the bytes of prompt tokens' dequantised copy (as engine.runtime.budgets counts them); None where
    the matrices are dequantised before their layer runs."""
    if not sh.compress_weight:
        return None
    return _four_bit_prompt_copy(cfg, sh.compression, hw.compute_dtype, hw.compute_device)


@functools.cache
def _four_bit_prompt_copy(cfg: OPTConfig, compression: CompressionConfig, dtype_name: str,
                          device_type: str) -> int | None:
    layout = StoreLayout.of(cfg, compression)
    dtype, device = torch_dtype(dtype_name), torch.device(device_type)
    matrices = [e for entries in layout.layers.values() for e in entries
                if e.compressed and e.name not in ROW_LOOKUP_TABLES]
    if not all(kernel_of(e, dtype, device) is not None for e in matrices):
        return None
    return four_bit_prompt_copy_bytes(cfg, layout, dtype, device)
