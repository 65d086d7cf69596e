"""The zig-zag block schedule (FlexGen, Sheng et al. 2023, section 4.2).

A block is up to gpu_batch_size x num_gpu_batches rows. For every step (step 0 is the prefill), for
every layer, the layer's weights are loaded once and shared by all micro-batches of the block, and
while micro-batch k computes, the I/O thread already loads the next layer's weights and the next
micro-batch's KV cache, and stores finished activations and cache. Without overlap the same loads
run inline. The math lives in `layers`, placement in `placement`, bytes in `tiers`.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from engine import layers
from engine.kv_cache import CacheSlot
from engine.model_config import OPTConfig
from engine.placed_weights import PlacedWeights
from engine.placement import slot_tier
from engine.policy import Policy
from engine.rows import GenerationParams, RowResult, StepUpdate
from engine.sampling import choose_tokens
from engine.tiers import DiskTier, Tier, TransferStats, to_device
from engine.weights import layer_names


@dataclass
class ScheduleContext:
    cfg: OPTConfig
    policy: Policy
    device: torch.device
    dtype: torch.dtype
    weights: PlacedWeights
    disk: DiskTier
    stats: TransferStats
    io: ThreadPoolExecutor | None  # None: no overlap


@dataclass
class BlockRow:
    result: RowResult
    context_ids: list[int]  # prompt + tokens generated before this run
    max_new_tokens: int


class _Done(Future):
    """An already-finished future, for running the same code without overlap."""

    def __init__(self, value) -> None:
        super().__init__()
        self.set_result(value)


class MicroBatch:
    """Token ids, padding mask and positions of one micro-batch for the whole block."""

    def __init__(self, rows: list[BlockRow], prompt_len: int, max_len: int, pad_id: int, device) -> None:
        self.rows = rows
        B = len(rows)
        self.input_ids = torch.full((B, prompt_len), pad_id, dtype=torch.long)
        self.valid = torch.zeros((B, max_len), dtype=torch.bool)
        for i, row in enumerate(rows):
            n = len(row.context_ids)
            self.input_ids[i, prompt_len - n:] = torch.tensor(row.context_ids, dtype=torch.long)
            self.valid[i, prompt_len - n:] = True
        self.valid[:, prompt_len:] = True  # generated positions are never padding
        self.positions = layers.positions_from_mask(self.valid)
        self.input_ids, self.valid, self.positions = (t.to(device) for t in
                                                      (self.input_ids, self.valid, self.positions))
        self.length = 0  # positions in the cache after this step
        self.mask = None
        self.next_ids = self.input_ids  # the step's input: the prompt first, then the sampled tokens

    def begin_step(self, query_len: int) -> None:
        self.length += query_len
        self.query_len = query_len
        self.mask = layers.attention_mask(self.valid[:, : self.length], query_len)

    @property
    def step_positions(self) -> torch.Tensor:
        return self.positions[:, self.length - self.query_len: self.length]


class BlockRunner:
    def __init__(self, ctx: ScheduleContext, rows: list[BlockRow], workdir) -> None:
        self.ctx = ctx
        cfg, policy = ctx.cfg, ctx.policy
        gbs = policy.gpu_batch_size
        self.prompt_len = max(len(r.context_ids) for r in rows)
        self.steps = max(r.max_new_tokens - len(r.result.generated_ids) for r in rows)
        max_len = self.prompt_len + self.steps - 1  # the last token is never fed back
        self.mbs = [MicroBatch(rows[i:i + gbs], self.prompt_len, max_len, cfg.pad_token_id, ctx.device)
                    for i in range(0, len(rows), gbs)]
        self.layer_names = layer_names(cfg)
        K, L = len(self.mbs), cfg.num_layers
        self.cache = [[CacheSlot(slot_tier(j, k, L, policy.num_gpu_batches, policy.cache_gpu_percent,
                                           policy.cache_cpu_percent),
                                 (max_len, 2, len(mb.rows), cfg.hidden_size), ctx.dtype, ctx.device, ctx.disk,
                                 workdir / f"kv-{j}-{k}.bin", num_heads=cfg.num_heads,
                                 compression=policy.compression if policy.compress_cache else None)
                       for k, mb in enumerate(self.mbs)] for j in range(L)]
        self.act_tiers = [[slot_tier(j, k, L + 2, policy.num_gpu_batches, policy.activations_gpu_percent,
                                     policy.activations_cpu_percent) for k in range(K)] for j in range(L + 2)]
        self.act_path = [workdir / f"act-{k}.bin" for k in range(K)]
        self.acts: list[Future | None] = [None] * K

    # -- I/O helpers: submitted to the I/O thread with overlap, run inline without -------------
    def submit(self, fn, *args) -> Future:
        if self.ctx.io is None:
            return _Done(fn(*args))
        return self.ctx.io.submit(fn, *args)

    def _store_act(self, j: int, k: int, h: torch.Tensor) -> None:
        tier = self.act_tiers[j][k]
        if tier == Tier.DISK:
            shape, data = h.shape, h.to("cpu").contiguous()
            self.submit(self.ctx.disk.write, self.act_path[k], 0, data)
            self.acts[k] = self.submit(self._read_act, k, shape, data.numel() * data.element_size())
        else:
            self.acts[k] = _Done(h if tier == Tier.GPU else h.to("cpu"))

    def _read_act(self, k: int, shape, nbytes: int) -> torch.Tensor:
        raw = self.ctx.disk.read(self.act_path[k], 0, nbytes)
        return raw.view(self.ctx.dtype).view(shape)

    # -- the schedule -----------------------------------------------------------------------
    def run(self, params: GenerationParams, stop_ids: set[int], block_index: int,
            on_step: Callable[[StepUpdate], None] | None, should_stop: Callable[[], bool] | None) -> bool:
        """Generate until every row is finished; returns True if stopped early by `should_stop`."""
        ctx, names = self.ctx, self.layer_names
        weights_next = self.submit(ctx.weights.fetch, names[0])
        try:
            for step in range(self.steps):
                started = time.perf_counter()
                for mb in self.mbs:
                    mb.begin_step(self.prompt_len if step == 0 else 1)
                for j, name in enumerate(names):
                    w = ctx.weights.finish(weights_next.result())
                    # Prefetch the next layer (wrapping to the embedding for the next step).
                    weights_next = self.submit(ctx.weights.fetch, names[(j + 1) % len(names)])
                    self._run_layer(j, w, params)
                del w
                new_tokens = self._finish_step(stop_ids)
                if on_step:
                    on_step(StepUpdate(block_index=block_index, step=step,
                                       rows=[r.result for mb in self.mbs for r in mb.rows],
                                       new_tokens=new_tokens, elapsed_s=time.perf_counter() - started))
                if all(r.result.finished for mb in self.mbs for r in mb.rows):
                    return False
                if should_stop and should_stop():
                    return True
            return False
        finally:
            if ctx.io is not None:
                weights_next.cancel()
                ctx.io.submit(lambda: None).result()  # drain pending stores before deleting files
            for row in self.cache:
                for slot in row:
                    slot.close()
            for path in self.act_path:
                path.unlink(missing_ok=True)

    def _run_layer(self, j: int, w: dict, params: GenerationParams) -> None:
        L = self.ctx.cfg.num_layers
        if j == 0:
            for k, mb in enumerate(self.mbs):
                self._store_act(j, k, layers.input_embed(w, self.ctx.cfg, mb.next_ids, mb.step_positions,
                                                        self.ctx.dtype))
            return
        if j == L + 1:
            for k, mb in enumerate(self.mbs):
                h = to_device(self.acts[k].result(), self.ctx.device, self.ctx.stats)
                self._sample(mb, layers.output_logits(w, self.ctx.cfg, h[:, -1]), params)
            return
        slots = self.cache[j - 1]
        # Disk slots: their reads are prefetched one micro-batch ahead.
        reads = {0: self._prefetch_read(slots[0])} if slots[0].tier == Tier.DISK else {}
        for k, mb in enumerate(self.mbs):
            if k + 1 < len(self.mbs) and slots[k + 1].tier == Tier.DISK:
                reads[k + 1] = self._prefetch_read(slots[k + 1])
            h = to_device(self.acts[k].result(), self.ctx.device, self.ctx.stats)
            self._store_act(j, k, self._decoder(w, h, slots[k], reads.get(k), mb))

    def _cache_device(self, slot: CacheSlot) -> torch.device:
        """Where a slot's cache is attended: on the CPU with cpu_cache_compute, else the compute device."""
        if self.ctx.policy.cpu_cache_compute and slot.tier != Tier.GPU:
            return torch.device("cpu")
        return self.ctx.device

    def _prefetch_read(self, slot: CacheSlot) -> Future:
        return self.submit(slot.read, self._cache_device(slot), self.ctx.stats)

    def _decoder(self, w: dict, h: torch.Tensor, slot: CacheSlot, read: Future | None,
                 mb: MicroBatch) -> torch.Tensor:
        cfg, ctx = self.ctx.cfg, self.ctx
        q, k, v = layers.qkv(w, cfg, h)
        new = layers.cache_rows(k, v)  # [s, 2, B, h]
        if slot.tier == Tier.DISK or slot.compression is not None:
            # The cache read so far plus the new positions in full precision (a compressed slot
            # must not attend to a quantised copy of the positions it just computed: HF doesn't).
            where = self._cache_device(slot)
            prev = read.result() if read is not None else slot.read(where, ctx.stats)
            full = new.to(where) if prev is None else torch.cat((prev.to(where, new.dtype), new.to(where)))
            if slot.tier == Tier.DISK:
                self.submit(slot.append, new.contiguous())
            else:
                slot.append(new)
        else:
            slot.append(new)
            full = slot.read()
        if ctx.policy.cpu_cache_compute and full.device.type == "cpu" and q.device.type != "cpu":
            # Attention where the cache lives: ship q (small) instead of the cache (large).
            attn = layers.attend(cfg, q.cpu(), full[:, 0], full[:, 1], mb.mask.cpu()).to(q.device)
        else:
            full = to_device(full, ctx.device, ctx.stats)
            attn = layers.attend(cfg, q, full[:, 0], full[:, 1], mb.mask)
        h = layers.attention_output(w, cfg, h, attn)
        return layers.mlp(w, cfg, h)

    def _sample(self, mb: MicroBatch, logits: torch.Tensor, params: GenerationParams) -> None:
        results = [r.result for r in mb.rows]
        tokens = choose_tokens(logits, params, [r.row_id for r in results],
                               [len(r.generated_ids) for r in results])
        mb.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.ctx.device)[:, None]
        mb.sampled = tokens

    def _finish_step(self, stop_ids: set[int]) -> int:
        new_tokens = 0
        for mb in self.mbs:
            for row, token in zip(mb.rows, mb.sampled):
                res = row.result
                if res.finished:
                    continue
                res.generated_ids.append(token)
                new_tokens += 1
                if token in stop_ids:
                    res.finish_reason = "stop"
                elif len(res.generated_ids) >= row.max_new_tokens:
                    res.finish_reason = "length"
        return new_tokens
