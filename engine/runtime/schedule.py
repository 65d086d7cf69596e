"""The zig-zag block schedule (FlexGen, Sheng et al. 2023, section 4.2).

A block is up to gpu_batch_size x num_gpu_batches rows. For every step (step 0 is the prefill), for
every layer, the layer's weights are loaded once and shared by all micro-batches of the block, and
while micro-batch k computes, the I/O thread already loads the next layer's weights and the next
micro-batch's KV cache, and stores finished activations and cache. Without overlap the same loads
run inline. The math lives in `layers`, placement in `placement`, bytes in `tiers`, the rows in
`micro_batch`.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from engine.model.families import family_math
from engine.model.kernel_shapes import key_capacity
from engine.model.attention import attend, attend_aligned
from engine.runtime.budgets import STORES_IN_FLIGHT, cache_read_sets
from engine.runtime.compression import QuantizedTensor
from engine.runtime.kv_cache import CachePart, CacheSlot
from engine.model.config import ModelConfig
from engine.runtime.placed_weights import PlacedWeights
from engine.runtime.placement import slot_tier
from engine.runtime.policy import Policy
from engine.runtime.micro_batch import BlockRow, MicroBatch
from engine.runtime.rows import GenerationParams, StepUpdate
from engine.model.sampling import choose_tokens
from engine.runtime.tiers import DiskTier, Tier, TransferStats, to_device
from engine.model.checkpoint import layer_names


@dataclass
class ScheduleContext:
    cfg: ModelConfig
    policy: Policy
    device: torch.device
    dtype: torch.dtype
    weights: PlacedWeights
    disk: DiskTier
    stats: TransferStats
    io: ThreadPoolExecutor | None  # None: no overlap


class _Done(Future):
    """An already-finished future, for running the same code without overlap."""

    def __init__(self, value) -> None:
        super().__init__()
        self.set_result(value)


def _held_bytes(args: tuple) -> int:
    """Bytes of the tensors a queued write holds (each plane of a quantised one)."""
    tensors = [t for a in args for t in ((a.data, a.scale, a.minimum) if isinstance(a, QuantizedTensor) else (a,))]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class BlockRunner:
    def __init__(self, ctx: ScheduleContext, rows: list[BlockRow], workdir) -> None:
        self.ctx = ctx
        cfg, policy = ctx.cfg, ctx.policy
        gbs = policy.gpu_batch_size
        self.prompt_len = max(len(r.context_ids) for r in rows)
        self.steps = max(r.max_new_tokens - len(r.result.generated_ids) for r in rows)
        max_len = self.prompt_len + self.steps - 1  # the last token is never fed back
        self.layers = family_math(cfg)
        self.mbs = [MicroBatch(rows[i:i + gbs], self.prompt_len, max_len, cfg.pad_token_id, cfg.num_kv_heads,
                               self.layers, ctx.device)
                    for i in range(0, len(rows), gbs)]
        self.layer_names = layer_names(cfg)
        K, L = len(self.mbs), cfg.num_layers
        self.cache = [[CacheSlot(len(mb.rows), max_len, cfg.num_kv_heads, cfg.head_dim, policy.cache_gpu_percent,
                                 policy.cache_cpu_percent, ctx.dtype, ctx.device, ctx.disk,
                                 workdir / f"kv-{j}-{k}.bin",
                                 compression=policy.compression if policy.compress_cache else None, first=mb.first)
                       for k, mb in enumerate(self.mbs)] for j in range(L)]
        self.cache_reads: dict[tuple[int, int], Future] = {}  # (layer, micro-batch) -> disk part read ahead
        # Read buffers of the cache's disk part (budgets.cache_read_sets): one set per micro-batch, or
        # with one micro-batch two, alternating by layer: the slot in use and the one read ahead.
        self.cache_read_buffers = [{} for _ in range(cache_read_sets(K))]
        self.step = 0
        self.act_tiers = [[slot_tier(j, k, L + 2, policy.num_gpu_batches, policy.activations_gpu_percent,
                                     policy.activations_cpu_percent) for k in range(K)] for j in range(L + 2)]
        self.act_path = [workdir / f"act-{k}.bin" for k in range(K)]
        self.acts: list[Future | None] = [None] * K
        self.store_error: BaseException | None = None  # set on the I/O thread by a failed store
        self.stores_in_flight: deque[tuple[Future, int]] = deque()  # queued writes and the bytes each holds
        self.store_bytes_in_flight = 0
        self.largest_store = 0

    # -- I/O helpers: submitted to the I/O thread with overlap, run inline without -------------
    def submit(self, fn, *args) -> Future:
        if self.ctx.io is None:
            return _Done(fn(*args))
        return self.ctx.io.submit(self._unless_a_store_failed, fn, *args)

    def submit_store(self, fn, *args) -> None:
        """A write nobody waits for: if it fails (a full disk), every later I/O call and the next
        layer raise its error, rather than what reading the missing data back would lead to.
        Queued writes hold at most STORES_IN_FLIGHT times the largest one's bytes (the budget's
        reserve): each holds a copy of what it writes (a prefill's keys and values of a
        micro-batch), and a disk slower than the compute thread would otherwise queue one per
        micro-batch and layer, past the CPU budget. A decode step's one position is a hundredth of
        that, so its writes queue behind the step's reads instead of holding the compute thread
        until the I/O thread reaches them."""
        if self.ctx.io is None:
            fn(*args)
            return
        held = _held_bytes(args)
        self.largest_store = max(self.largest_store, held)
        while self.stores_in_flight and (self.stores_in_flight[0][0].done() or
                                         self.store_bytes_in_flight + held > STORES_IN_FLIGHT * self.largest_store):
            queued, nbytes = self.stores_in_flight.popleft()
            queued.exception()  # waits; a failure is in store_error
            self.store_bytes_in_flight -= nbytes
        self.stores_in_flight.append((self.ctx.io.submit(self._recording_failure, fn, *args), held))
        self.store_bytes_in_flight += held

    def _unless_a_store_failed(self, fn, *args):
        if self.store_error is not None:
            raise self.store_error
        return fn(*args)

    def _recording_failure(self, fn, *args) -> None:
        try:
            self._unless_a_store_failed(fn, *args)
        except BaseException as exc:
            self.store_error = self.store_error or exc
            raise

    def _store_act(self, j: int, k: int, h: torch.Tensor) -> None:
        tier = self.act_tiers[j][k]
        if tier == Tier.DISK:
            shape, data = h.shape, h.to("cpu").contiguous()
            self.submit_store(self.ctx.disk.write, self.act_path[k], 0, data)
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
        self.weights_next = self.submit(ctx.weights.fetch, names[0])
        try:
            for step in range(self.steps):
                self.step = step
                started = time.perf_counter()
                for mb in self.mbs:
                    mb.begin_step(self.prompt_len if step == 0 else 1)
                for j in range(len(names)):
                    w = ctx.weights.finish(self.weights_next.result())
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
                self.weights_next.cancel()
                ctx.io.submit(lambda: None).result()  # drain pending stores before deleting files
            for row in self.cache:
                for slot in row:
                    slot.close()
            for path in self.act_path:
                path.unlink(missing_ok=True)

    def _prefetch_weights(self, j: int) -> None:
        """Start loading the layer after j (wrapping to the embedding for the next step)."""
        self.weights_next = self.submit(self.ctx.weights.fetch, self.layer_names[(j + 1) % len(self.layer_names)])

    def _prefetch_cache(self, j: int, k: int) -> None:
        """Start reading the disk part of the cache slot used after layer j's micro-batch k: the I/O
        thread reads in the order the compute thread needs, one slot ahead, across layers."""
        j, k = (j, k + 1) if k + 1 < len(self.mbs) else (j + 1, 0)
        self._read_cache(j, k)

    def _read_cache(self, j: int, k: int) -> None:
        """Start reading the disk part of slot (decoder layer j, micro-batch k) on the I/O thread into
        the read buffers of micro-batch k (of layer j's parity with one micro-batch), unless it is
        already being read. Every read of a slot is queued after the writes of its earlier positions,
        and the I/O thread runs in order, so it reads every position written so far."""
        if not 1 <= j <= self.ctx.cfg.num_layers or (j, k) in self.cache_reads:
            return
        part = self.cache[j - 1][k].disk_part
        if part is not None:
            buffers = self.cache_read_buffers[k if len(self.mbs) > 1 else j % 2]
            self.cache_reads[j, k] = self.submit(part.read, self._cache_device(part), self.ctx.stats, buffers)

    def _run_layer(self, j: int, w: dict, params: GenerationParams) -> None:
        if self.store_error is not None:
            raise self.store_error
        L = self.ctx.cfg.num_layers
        if j == 0 or j == L + 1:
            self._prefetch_weights(j)
        if j == 0:
            self._prefetch_cache(0, len(self.mbs) - 1)  # the first decoder layer's first slot
            for k, mb in enumerate(self.mbs):
                self._store_act(j, k, self.layers.input_embed(w, self.ctx.cfg, mb.next_ids, mb.step_positions,
                                                              self.ctx.dtype, mb.step_prompt))
            return
        if j == L + 1:
            for k, mb in enumerate(self.mbs):
                h = to_device(self.acts[k].result(), self.ctx.device, self.ctx.stats)
                self._sample(mb, self.layers.output_logits(w, self.ctx.cfg, h[:, -1]), params)
            return
        slots = self.cache[j - 1]
        if self.mbs[0].query_len == 1 and len(self.mbs) > 1:
            self._decode_layer(j, w, slots)
            return
        for k, mb in enumerate(self.mbs):
            self._prefetch_in_order(j, k)
            h = to_device(self.acts[k].result(), self.ctx.device, self.ctx.stats)
            self._store_act(j, k, self._decoder(w, h, slots[k], self.cache_reads.pop((j, k), None), mb))

    def _prefetch_in_order(self, j: int, k: int) -> None:
        """Before micro-batch k of layer j: the I/O thread works in the order the compute thread needs
        things: micro-batch 1's cache, the next layer's weights, then its first micro-batch's cache."""
        if k == 0 and len(self.mbs) == 1:
            self._prefetch_weights(j)
        self._prefetch_cache(j, k)
        if k == 0 and len(self.mbs) > 1:
            self._prefetch_weights(j)

    def _decode_layer(self, j: int, w: dict, slots: list[CacheSlot]) -> None:
        """A decode step's decoder layer over the whole block: the projections and the MLP take every
        micro-batch's rows in one call, so each matrix is streamed through the cores once per step
        instead of once per micro-batch (a few-row matmul is bound by reading its weights; a
        decode step's activations are a few MB, where a prefill's are what micro-batches bound).
        Attention stays per micro-batch, over its own cache slot. A row's bits do not change: the
        linear layers give each row the same bits at every call size (kernels.linear), and
        LayerNorm, the residual adds and the activation work row by row."""
        cfg, layers = self.ctx.cfg, self.layers
        hs = [to_device(act.result(), self.ctx.device, self.ctx.stats) for act in self.acts]
        sizes = [h.shape[0] for h in hs]
        h = torch.cat(hs)
        for i in range(len(self.mbs)):
            self._read_cache(j, i)  # queued by the layer before, but in the first decode step's first layer
        self._prefetch_weights(j)  # the next layer's weights are read while this one computes
        q, k, v = layers.qkv(w, cfg, h, torch.cat([mb.step_positions for mb in self.mbs]))
        attn = []
        # A micro-batch's read buffers are free once it has attended: the next layer's slot of it is
        # read into them, so the disk works through this layer's MLP (after the last decoder layer:
        # the first one's, for the next step).
        last_step = self.step + 1 >= self.steps
        next_j = j + 1 if j < cfg.num_layers else (None if last_step else 1)
        for i, (mb, q_mb, k_mb, v_mb) in enumerate(zip(self.mbs, q.split(sizes), k.split(sizes), v.split(sizes))):
            attn.append(self._attend_step(q_mb, k_mb, v_mb, slots[i], self.cache_reads.pop((j, i), None), mb))
            if next_j is not None:
                self._read_cache(next_j, i)
        h = layers.mlp(w, cfg, layers.attention_output(w, cfg, h, torch.cat(attn)))
        for i, h_mb in enumerate(h.split(sizes)):
            self._store_act(j, i, h_mb)

    def _cache_device(self, part: CachePart) -> torch.device:
        """Where a part of the cache is attended: on the CPU with cpu_cache_compute, else the compute device."""
        if self.ctx.policy.cpu_cache_compute and part.tier != Tier.GPU:
            return torch.device("cpu")
        return self.ctx.device

    def _decoder(self, w: dict, h: torch.Tensor, slot: CacheSlot, read: Future | None,
                 mb: MicroBatch) -> torch.Tensor:
        # The attention's intermediates (q/k/v, the stacked cache rows, the query pairs: ~7 hidden
        # states of the micro-batch) are freed when _attention returns, before the MLP allocates its
        # own: held to the end of the layer they set the prefill's peak (engine.runtime.budgets).
        prompt = mb.step_prompt
        h = self.layers.attention_output(w, self.ctx.cfg, h, self._attention(w, h, slot, read, mb), prompt)
        return self.layers.mlp(w, self.ctx.cfg, h, prompt)

    def _attention(self, w: dict, h: torch.Tensor, slot: CacheSlot, read: Future | None,
                   mb: MicroBatch) -> torch.Tensor:
        """The micro-batch's attention output [B, s, h], its keys and values appended to the cache."""
        q, k, v = self.layers.qkv(w, self.ctx.cfg, h, mb.step_positions, mb.step_prompt)
        return self._attend_step(q, k, v, slot, read, mb)

    def _attend_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot: CacheSlot,
                     read: Future | None, mb: MicroBatch) -> torch.Tensor:
        """Attention of one micro-batch's projected q, k, v [B, s, .] over its cache slot -> [B, s, h]."""
        cfg = self.ctx.cfg
        layers = self.layers
        prefill = mb.length == mb.query_len  # nothing cached yet: attend the new positions whole
        new = None
        if not prefill or any(part.aligned is None for part in slot.parts):
            rows = layers.cache_rows(k, v)  # [s, 2, B, Hkv*D]
            new = rows.reshape(rows.shape[0], 2, -1, cfg.head_dim)  # [s, 2, B*Hkv, D]: the (row, KV head) pairs
        q_pairs = layers.to_pairs(cfg, q)  # [B*Hkv, G*s, D]: the G query heads of each pair, head-major
        if prefill:
            out = []
            for part in slot.parts:
                if part.aligned is not None:
                    part.append_heads(k, v)
                    out.append(self._attend_aligned_part(part, q_pairs[part.pairs], mb))
                    continue
                stored = part.encode(new[:, :, part.pairs])
                self._append(part, stored)
                seen = part.attended(stored)
                out.append(attend(q_pairs[part.pairs], seen[:, 0], seen[:, 1],
                                  span=mb.key_span(part.pairs, q_pairs.shape[1], q.device)))
        else:
            out = [self._attend_part(part, q_pairs[part.pairs], new[:, :, part.pairs], mb,
                                     read if part.tier == Tier.DISK else None) for part in slot.parts]
        return layers.from_pairs(cfg, out[0] if len(out) == 1 else torch.cat(out))

    def _append(self, part: CachePart, stored) -> None:
        """Store what `part.encode` gave: on the I/O thread for a disk part (a raw tensor copied
        contiguous first, as the compute thread goes on with its storage)."""
        if part.tier == Tier.DISK:
            self.submit_store(part.append, stored.contiguous() if isinstance(stored, torch.Tensor) else stored)
        else:
            part.append(stored)

    def _attend_part(self, part: CachePart, q: torch.Tensor, new: torch.Tensor, mb: MicroBatch,
                     read: Future | None) -> torch.Tensor:
        """One part's attention for a decode step: q [n, G, D], new [1, 2, n, D]; the step's key span
        of the part's pairs comes from the micro-batch (made once a step)."""
        ctx = self.ctx
        if part.aligned is not None:
            part.append(new)
            return self._attend_aligned_part(part, q, mb)
        # A disk or compressed part: the cache read so far plus the new position as the cache will hold it.
        where = self._cache_device(part)
        prev = read.result() if read is not None else part.read(where, ctx.stats)
        stored = part.encode(new)
        seen = part.attended(stored)
        if prev.shape[0] > part.length:  # read with room: write the new position in place
            full = prev
            full[part.length:].copy_(seen)
        else:
            full = torch.cat((prev.to(where, new.dtype), seen.to(where)))
        self._append(part, stored)
        if ctx.policy.cpu_cache_compute and full.device.type == "cpu" and q.device.type != "cpu":
            return self._attend_on_cpu(attend, q, full[:, 0], full[:, 1], part, mb)
        full = to_device(full, ctx.device, ctx.stats)
        return attend(q, full[:, 0], full[:, 1], span=mb.key_span(part.pairs, q.shape[1], q.device))

    def _attend_aligned_part(self, part: CachePart, q: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """Attention over a memory part's aligned keys and values where they are (a prefill's S
        queries or a decode step's one)."""
        keys, values = part.aligned.keys, part.aligned.values
        if keys.device == q.device:
            return attend_aligned(q, keys, values, span=mb.key_span(part.pairs, q.shape[1], q.device))
        if self.ctx.policy.cpu_cache_compute and keys.device.type == "cpu":
            return self._attend_on_cpu(attend_aligned, q, keys, values, part, mb)
        span = mb.key_span(part.pairs, q.shape[1], q.device)
        used = min(key_capacity(span.key_count), keys.shape[1])  # the step's keys: length - min(first)
        keys, values = (to_device(t[:, :used], self.ctx.device, self.ctx.stats) for t in (keys, values))
        return attend_aligned(q, keys, values, span=span)

    @staticmethod
    def _attend_on_cpu(attention: Callable, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       part: CachePart, mb: MicroBatch) -> torch.Tensor:
        """Attention where the cache lives (cpu_cache_compute): q (small) goes to the CPU instead of
        the cache (large), and the output comes back to q's device."""
        span = mb.key_span(part.pairs, q.shape[1], keys.device)
        return attention(q.cpu(), keys, values, span=span).to(q.device)

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
