"""Memory budgets: what a policy needs per tier, checked before anything is allocated, and the
measured peak (process RSS sampled while generating; the CUDA allocator's peak).

On a host without CUDA the GPU tier is RAM, so everything counts against the CPU budget (and the
GPU budget is not used). The CPU figure includes the process as it already is (Python, torch,
tokenizer), because the CPU budget is a promise about the whole process's resident memory.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import psutil
import torch

from engine.errors import BudgetError
from engine.model.config import ModelConfig
from engine.model.four_bit import prompt_copy_bytes
from engine.model.kernel_shapes import key_capacity, query_plan
from engine.runtime.compression import packed_nbytes, quantize_scratch_bytes
from engine.runtime.placement import cache_pair_split, slot_tier
from engine.runtime.policy import CompressionConfig, Policy
from engine.runtime.tiers import Tier, align_up
from engine.runtime.weight_tiers import (ROW_LOOKUP_TABLES, bytes_by_tier, kernel_of, plan_weight_tiers,
                                         read_in_place)
from engine.model.checkpoint import TensorEntry, WeightStore, layer_names, layer_tensor_specs

GIB = 1024**3
# Writes the schedule queues on its I/O thread at once, each holding a copy of what it writes.
STORES_IN_FLIGHT = 2

# What the compute libraries allocate on first use and keep (oneDNN/MKL scratch and caches, thread
# pools): 31-34 MiB of RSS measured on x86 CPUs with one or two threads, whatever the model.
RUNTIME_BYTES = 40 * 2**20
# Blocks up to this size stay in the heap when freed, where the budget has room (configure_allocator).
KEEP_FREED_THRESHOLD = 256 << 20


@dataclass
class MemoryEstimate:
    gpu: dict[str, int]
    cpu: dict[str, int]

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


@dataclass(frozen=True)
class StoreLayout:
    """The tensors a converted weight store of a model holds, sized from its config alone (as
    engine.model.checkpoint.convert_checkpoint writes them: fp16, or matrices packed group-wise):
    what the budget check needs to size a policy before any store exists, e.g. for the planner."""
    layers: dict[str, list[TensorEntry]]

    @classmethod
    def of(cls, cfg: ModelConfig, compression: CompressionConfig | None = None) -> "StoreLayout":
        layers = {}
        for layer in layer_names(cfg):
            layers[layer] = [_entry(name, shape, compression) for name, shape in layer_tensor_specs(cfg, layer)]
        return cls(layers)


def _entry(name: str, shape: tuple[int, ...], compression: CompressionConfig | None) -> TensorEntry:
    if compression is None or len(shape) != 2:
        numel = 1
        for s in shape:
            numel *= s
        return TensorEntry(name, shape, 0, 2 * numel)
    nbytes = packed_nbytes(shape, compression.num_bits, compression.group_size)
    return TensorEntry(name, shape, 0, nbytes, compression.num_bits, compression.group_size)


def _weight_bytes(cfg: ModelConfig, store: WeightStore | StoreLayout, policy: Policy, dtype: torch.dtype,
                  device: torch.device) -> tuple[dict[Tier, int], int]:
    """Bytes of weights each tier holds, and the buffers streaming needs: two layers in flight (one
    computing, one being prefetched: read from disk and/or dequantised) plus the raw read buffers,
    one decoder layer's (kept for reuse) and the embedding's or head's while it is converted.
    A 4-bit matrix that a kernel multiplies as it is, or a tensor read from its copy converted to
    the compute dtype (weight_tiers.read_in_place), has no converted copy: streamed, its bytes are
    read into a buffer kept per layer parity (two for a decoder tensor, one for the head's). A 4-bit
    matrix's prompt tokens' dequantised copy is one reused buffer, as large as the largest such
    matrix outside the head (the head computes generated tokens only)."""
    size = torch.empty((), dtype=dtype).element_size()
    tiers = plan_weight_tiers(store, cfg, policy)
    streamed, decoder_read, other_read = 0, 0, 0
    kernel_reads: dict[tuple, int] = {}
    for index, (layer, layer_tiers) in enumerate(tiers.items()):
        in_flight = 0  # tensors materialised per use
        read = 0  # raw bytes of the layer's disk tensors, all read before any is converted
        for entry in store.layers[layer]:
            tier = layer_tiers[entry.name]
            if entry.name in ROW_LOOKUP_TABLES:  # rows gathered, never a whole converted copy
                continue
            if read_in_place(entry, dtype, device):
                if tier == Tier.DISK:
                    kernel_reads[(index % 2, entry.name, entry.shape)] = align_up(entry.nbytes)
                continue
            if tier == Tier.DISK or entry.compressed:
                in_flight += entry.compute_bytes(size)
            if tier == Tier.DISK:
                read += align_up(entry.nbytes)
        streamed = max(streamed, in_flight)
        if layer.startswith("decoder."):
            decoder_read = max(decoder_read, read)
        else:
            other_read = max(other_read, read)
    buffers = (2 * streamed + decoder_read + other_read + sum(kernel_reads.values())
               + four_bit_prompt_copy_bytes(cfg, store, dtype, device))
    return bytes_by_tier(store, tiers, size), buffers


def four_bit_prompt_copy_bytes(cfg: ModelConfig, store: WeightStore | StoreLayout, dtype: torch.dtype,
                               device: torch.device) -> int:
    """The reused buffer of prompt tokens' dequantised copy of a 4-bit matrix that a kernel
    multiplies (engine.model.kernels): as large as the largest such matrix outside the head,
    which computes generated tokens only; 0 where there is none."""
    head = layer_names(cfg)[-1]
    sizes = [prompt_copy_bytes(kernel, entry.shape[0] * entry.shape[1])
             for layer, entries in store.layers.items() if layer != head
             for entry in entries if (kernel := kernel_of(entry, dtype, device)) is not None]
    return max(sizes, default=0)


def cache_read_sets(num_gpu_batches: int) -> int:
    """Read buffers the schedule keeps for the disk part of the cache, one slot each: with several
    micro-batches one per micro-batch (a decode step reads the next layer's slot of a micro-batch
    into its buffer as soon as that micro-batch has attended this layer, so the disk reads the next
    layer's cache while this layer's MLP computes); with one, the slot in use and the one read ahead."""
    return max(num_gpu_batches, 2)


def cache_buffer_slots(num_gpu_batches: int) -> int:
    """Slots of RAM the disk part of the cache needs: its read buffers (`cache_read_sets`) and one
    more, a compressed part's dequantised copy with the new position appended."""
    return cache_read_sets(num_gpu_batches) + 1


def _cache_bytes(cfg: ModelConfig, policy: Policy, slot: int) -> tuple[dict[Tier, int], int]:
    """KV cache bytes per tier for slots of `slot` bytes, and the RAM buffers of its disk part
    (`cache_buffer_slots`)."""
    pairs = policy.gpu_batch_size * cfg.num_kv_heads  # every slot is split the same way, by (row, KV head) pairs
    split = cache_pair_split(pairs, policy.cache_gpu_percent, policy.cache_cpu_percent)
    per_tier = {t: cfg.num_layers * policy.num_gpu_batches * slot * n // pairs
                for t, n in zip((Tier.GPU, Tier.CPU, Tier.DISK), split)}
    return per_tier, cache_buffer_slots(policy.num_gpu_batches) * slot * split[2] // pairs


def _activation_bytes(cfg: ModelConfig, policy: Policy, act: int) -> dict[Tier, int]:
    """A tier that holds any activation slot holds one hidden state (`act` bytes) per micro-batch."""
    L, K = cfg.num_layers, policy.num_gpu_batches
    act_tiers = {slot_tier(j, k, L + 2, K, policy.activations_gpu_percent, policy.activations_cpu_percent)
                 for j in range(L + 2) for k in range(K)}
    return {t: act * K if t in act_tiers else 0 for t in Tier}


def cache_slot_bytes(cfg: ModelConfig, policy: Policy, max_len: int, element_size: int) -> int:
    """Bytes of one (layer, micro-batch) cache slot at max_len positions, as held: [max_len, 2,
    rows * KV heads, head_dim] (the cache holds the KV heads only: grouped-query attention), in the
    compute dtype with max_len rounded up to KEY_ALIGN (attention's aligned layout of a part in
    memory; a disk part holds max_len positions), or with compress_cache packed group-wise along
    head_dim (codes + fp16 scale and minimum per group; engine.runtime.kv_cache)."""
    vectors = max_len * 2 * policy.gpu_batch_size * cfg.num_kv_heads
    if not policy.compress_cache or not vectors:
        return key_capacity(max_len) * 2 * policy.gpu_batch_size * cfg.num_kv_heads * cfg.head_dim * element_size
    comp = policy.compression
    return packed_nbytes((vectors, cfg.head_dim), comp.num_bits, comp.group_size)


def estimate_memory(cfg: ModelConfig, store: WeightStore | StoreLayout, policy: Policy, device: torch.device,
                    dtype: torch.dtype, *, prompt_len: int, gen_len: int,
                    resident_ram_bytes: int = 0, process_bytes: int | None = None) -> MemoryEstimate:
    """resident_ram_bytes: weights this process already holds in RAM (a loaded engine's); they are
    part of its RSS, so they are taken out of "process" rather than counted twice.
    process_bytes: the process's own memory; None measures this process (its RSS as it stands, freed
    heap memory that configure_allocator keeps for reuse included)."""
    size = torch.empty((), dtype=dtype).element_size()
    weights, stream_buffers = _weight_bytes(cfg, store, policy, dtype, device)
    B, h = policy.gpu_batch_size, cfg.hidden_size
    max_len = prompt_len + max(gen_len - 1, 0)
    cache, disk_cache_buffers = _cache_bytes(cfg, policy, cache_slot_bytes(cfg, policy, max_len, size))
    act = prompt_len * B * h * size
    acts = _activation_bytes(cfg, policy, act)
    working = prefill_working_bytes(cfg, policy, prompt_len, max_len, size) if prompt_len else 0
    if process_bytes is None:
        process_bytes = psutil.Process().memory_info().rss
    process = max(0, process_bytes - resident_ram_bytes)
    if device.type == "cuda":
        gpu = {"weights": weights[Tier.GPU], "streamed weights": stream_buffers, "kv cache": cache[Tier.GPU],
               "activations": acts[Tier.GPU], "working": working}
        cpu = {"weights": weights[Tier.CPU], "kv cache": cache[Tier.CPU] + disk_cache_buffers,
               "activations": acts[Tier.CPU] + (act if acts[Tier.DISK] else 0), "runtime": RUNTIME_BYTES,
               "process": process}
        return MemoryEstimate(gpu=gpu, cpu=cpu)
    cpu = {"weights": weights[Tier.GPU] + weights[Tier.CPU], "streamed weights": stream_buffers,
           "kv cache": cache[Tier.GPU] + cache[Tier.CPU] + disk_cache_buffers,
           "activations": acts[Tier.GPU] + acts[Tier.CPU] + (2 * act if acts[Tier.DISK] else 0),
           "working": working, "runtime": RUNTIME_BYTES, "process": process}
    return MemoryEstimate(gpu={}, cpu=cpu)


def prefill_working_bytes(cfg: ModelConfig, policy: Policy, prompt_len: int, max_len: int, element_size: int) -> int:
    """Transient compute memory of one micro-batch's prefill: q/k/v/out, the attention's query and
    output copies, the MLP's intermediate, one query group's scores, float32 logits of the last
    position, the aligned copies attention reads of disk or compressed cache parts, and the copies
    queued disk writes hold."""
    B, h, size = policy.gpu_batch_size, cfg.hidden_size, element_size
    # Attention reads the keys and values of a disk or compressed part as an aligned copy in the
    # compute dtype (engine.model.attention.attend; a part in memory is read in place); a compressed
    # cache is dequantised into one more such copy first. Quantising the positions a prefill
    # appends takes float32 scratch (one micro-batch at a time).
    pairs = B * cfg.num_kv_heads
    disk_pairs = cache_pair_split(pairs, policy.cache_gpu_percent, policy.cache_cpu_percent)[2]
    slot16 = cache_slot_bytes(cfg, policy.replace(compress_cache=False), max_len, size)
    attention = slot16 * disk_pairs // max(1, pairs)
    if policy.compress_cache:
        attention = 2 * slot16 + cache_quantize_scratch_bytes(cfg, B, prompt_len)
    # Copies held by queued disk writes: a prefill's keys and values of a micro-batch's disk pairs,
    # or a hidden state bound for disk.
    act = prompt_len * B * h * size
    queued_write = max(prompt_len * 2 * disk_pairs * cfg.head_dim * size,
                       act if _activation_bytes(cfg, policy, act)[Tier.DISK] else 0)
    # Hidden-state-sized intermediates: a prefill's micro-batch, or a decode step's whole block
    # (its projections and MLP take every micro-batch's rows at once).
    token_rows = max(prompt_len * B, policy.block_size)
    return (token_rows * (6 * h + cfg.mlp_width) * size + attention_scratch_bytes(cfg, B, prompt_len, size)
            + B * cfg.vocab_size * 4 * 2 + attention + STORES_IN_FLIGHT * queued_write)


def cache_quantize_scratch_bytes(cfg: ModelConfig, rows: int, prompt_len: int) -> int:
    """Float32 scratch of quantising the keys and values a prefill appends for `rows` rows."""
    return quantize_scratch_bytes(prompt_len * 2 * rows * cfg.num_kv_heads * cfg.head_dim)


def attention_scratch_bytes(cfg: ModelConfig, rows: int, prompt_len: int, element_size: int) -> int:
    """A prefill's largest attention call (engine.model.kernels): its scores (a reused buffer), their
    softmax and the boolean mask, for `rows` rows' query groups over the prompt's keys, and the
    value product's result and partial result (two more reused buffers)."""
    pairs, keys = rows * cfg.num_kv_heads, key_capacity(prompt_len)
    queries = prompt_len * cfg.num_heads // cfg.num_kv_heads
    group = max(query_plan(queries, pairs, keys))
    return pairs * group * (keys * (2 * element_size + 1) + 2 * cfg.head_dim * element_size)


def _describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)


def check_budgets(cfg: ModelConfig, store: WeightStore, policy: Policy, device: torch.device, dtype: torch.dtype,
                  gpu_mem_gib: float | None, cpu_mem_gib: float | None, *, prompt_len: int | None,
                  gen_len: int | None, resident_ram_bytes: int = 0) -> MemoryEstimate:
    """The estimate for a block (or for the weights alone), raising BudgetError where it exceeds a
    budget. The process's memory counts as its RSS stands, freed heap memory kept for reuse included;
    only where that fails the CPU budget is the freed memory returned to the system (malloc_trim)
    and the check made again. Trimming before every block made each prefill fault its freed
    intermediates in anew (2-vCPU Xeon VM, a 32-row opt-1.3b block in RAM: 204k page faults a
    prefill against 196.6k, the rest the cache's own fresh pages; prefill median 8.0 -> 7.5 s over
    nine alternated blocks a side)."""
    def estimate() -> MemoryEstimate:
        return estimate_memory(cfg, store, policy, device, dtype, prompt_len=prompt_len or 0, gen_len=gen_len or 0,
                               resident_ram_bytes=resident_ram_bytes)

    est = estimate()
    over = _over_budget(est, policy, device, gpu_mem_gib, cpu_mem_gib, prompt_len, gen_len)
    if over is not None and over.tier == "cpu":
        release_free_heap()
        est = estimate()
        over = _over_budget(est, policy, device, gpu_mem_gib, cpu_mem_gib, prompt_len, gen_len)
    if over is not None:
        raise over
    return est


def _over_budget(est: MemoryEstimate, policy: Policy, device: torch.device, gpu_mem_gib: float | None,
                 cpu_mem_gib: float | None, prompt_len: int | None, gen_len: int | None) -> BudgetError | None:
    when = (f"for a block of {policy.block_size} rows x {prompt_len}+{gen_len} tokens"
            if prompt_len else "for the weights alone")
    checks = (("gpu", "GPU", est.gpu, gpu_mem_gib if device.type == "cuda" else None),
              ("cpu", "CPU", est.cpu, cpu_mem_gib))
    for tier, label, parts, allowed in checks:
        needed = sum(parts.values())
        if allowed is not None and needed > allowed * GIB:
            return BudgetError(f"policy {policy.describe()} needs {needed / GIB:.2f} GiB of {label} memory {when} "
                               f"({_describe(parts)})", tier=tier, needed_gib=needed / GIB, allowed_gib=allowed)
    return None


@functools.cache
def _libc():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def release_free_heap() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim): one-off work such as converting
    a checkpoint leaves freed blocks that configure_allocator's heap would otherwise keep resident,
    and the process's RSS is measured against the CPU budget (check_budgets)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def configure_allocator(keep_freed_bytes: int = 0) -> None:
    """Set glibc's thresholds for tensor memory: blocks up to `keep_freed_bytes` (at least 1 MiB)
    come from the heap and are reused when freed; bigger ones are private mappings unmapped on free,
    so RSS holds only live tensors of that size.

    A prefill's intermediates (q/k/v, the MLP's hidden layer, LayerNorm outputs: 4-128 MiB each on
    opt-1.3b at 8-64 rows x 128 positions) are allocated and freed once per layer. Unmapped at
    free, each costs its page faults again in the next layer: a 32-row bf16 prefill of opt-1.3b
    took 19.8-24.5 s with a 1 MiB threshold, 18.0-19.9 s with 64 MiB and 15.3-15.5 s with 256 MiB
    (peak RSS within 0.1 GiB of each other). Kept freed blocks cost up to one more copy of the
    transient working memory, plus up to the threshold at the heap's top, so the engine keeps as
    much as the CPU budget has room for (`freed_bytes_to_keep`, Engine._run_block). Fixed
    thresholds, because glibc's own moves with the sizes freed and RSS would depend on history.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    threshold = max(1 << 20, keep_freed_bytes)
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    libc.mallopt(M_TRIM_THRESHOLD, threshold)


def freed_bytes_to_keep(est: MemoryEstimate, cpu_mem_gib: float | None) -> int:
    """The threshold for configure_allocator that the CPU budget holds on top of the estimate:
    KEEP_FREED_THRESHOLD without a budget; else what the budget leaves after one more copy of the
    transient working memory (freed blocks inside the heap; measured on opt-1.3b, 16 rows: 0.37 GiB
    kept after a prefill whose working memory is 0.1 GiB with the 256 MiB threshold), as a power of
    two up to KEEP_FREED_THRESHOLD; 0 where that is under 1 MiB. Over capacity under a tight budget
    a few tens of MiB still keep a small micro-batch's intermediates (opt-1.3b, 8 rows: 4-16 MiB)."""
    if cpu_mem_gib is None:
        return KEEP_FREED_THRESHOLD
    room = int(cpu_mem_gib * GIB) - est.cpu_total - est.cpu.get("working", 0)
    if room < 1 << 20:
        return 0
    return min(KEEP_FREED_THRESHOLD, 1 << (room.bit_length() - 1))


class RssSampler:
    """Samples the process's resident memory every few milliseconds while active; keeps the peak."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._depth = 0

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._depth += 1
        if self._depth == 1:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="flexjob-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0 and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
