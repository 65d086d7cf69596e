"""`Engine`: a model (OPT or the Llama family) placed on GPU/CPU/disk by a Policy, generating block
by block.

    engine = Engine("models/opt-1.3b", Policy(gpu_batch_size=8, num_gpu_batches=4,
                                              weights_gpu_percent=0, weights_cpu_percent=50))
    results = engine.generate([RowInput(row_id=0, prompt_ids=ids)], GenerationParams())

The compute device and dtype default to what this machine runs fastest (engine.runtime.devices).
Budgets (`gpu_mem_gib`, `cpu_mem_gib`) are checked before anything is loaded;
peaks are measured while generating (process RSS, CUDA allocator peak). Every finished block's
figures (`stats.blocks`: bytes and seconds per link) are returned to the caller, who decides whether
to learn from them (engine.planning.profile_store); the engine itself writes no profile.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from engine.runtime.budgets import RssSampler, check_budgets, configure_allocator, freed_bytes_to_keep
from engine.errors import PromptTooLongError
from engine.model.config import load_config
from engine.runtime.placed_weights import PlacedWeights
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput, RowResult, StepUpdate
from engine.runtime.micro_batch import BlockRow
from engine.runtime.schedule import BlockRunner, ScheduleContext
from engine.runtime.stats import EngineStats
from engine.runtime.tiers import DiskTier, TransferStats
from engine.model.checkpoint import WeightStore
from engine.runtime.devices import default_device, resolve_dtype
from engine.runtime.paths import engine_home


def check_lengths(config, rows: list[RowInput], params: GenerationParams) -> None:
    """Every row must fit the model's learned positions: prompt + new tokens <= max_positions."""
    limit = config.max_positions
    for row in rows:
        if len(row.prompt_ids) + params.max_new_tokens > limit:
            raise PromptTooLongError(
                f"row {row.row_id}: prompt of {len(row.prompt_ids)} tokens + {params.max_new_tokens} new "
                f"tokens exceeds the model's {limit} positions")


class Engine:
    def __init__(self, model_dir: str | Path, policy: Policy, *, dtype: str | None = None,
                 device: str | torch.device | None = None, offload_dir: str | Path | None = None,
                 gpu_mem_gib: float | None = None, cpu_mem_gib: float | None = None,
                 bypass_page_cache: bool = True, throttle_gbps: dict[str, float] | None = None,
                 on_convert: Callable[[str, int, int], None] | None = None, tokenizer=None) -> None:
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        configure_allocator()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.gpu_mem_gib, self.cpu_mem_gib = gpu_mem_gib, cpu_mem_gib
        self.offload_dir = Path(offload_dir) if offload_dir else engine_home()
        self.transfers = TransferStats()
        self.disk = DiskTier(self.offload_dir, self.transfers, bypass_page_cache=bypass_page_cache,
                             throttle_gbps=throttle_gbps)
        self.stats = EngineStats()
        self.rss = RssSampler()
        self._on_convert = on_convert
        store = self._open_store(policy)
        check_budgets(self.config, store, policy, self.device, self.dtype, gpu_mem_gib, cpu_mem_gib,
                      prompt_len=None, gen_len=None)
        self.policy = policy
        self.weights = PlacedWeights(store, self.config, policy, self.device, self.dtype, self.disk,
                                     self.transfers)
        self.transfers.snapshot_and_reset()  # loading is not part of the first block's figures
        self._io = ThreadPoolExecutor(1, thread_name_prefix="flexjob-io")
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    def set_throttle(self, link_gbps: dict[str, float]) -> None:
        """Cap links' bandwidth (GB/s; e.g. {"disk_read": 0.2}): a documented test knob that makes a
        slow disk on demand, so re-planning can be exercised. An empty dict lifts every cap."""
        self.disk.throttle_gbps = dict(link_gbps)

    def _open_store(self, policy: Policy) -> WeightStore:
        return WeightStore.open_or_convert(self.model_dir, self.config, self.offload_dir, self._on_convert,
                                           policy.compression if policy.compress_weight else None)

    def set_policy(self, policy: Policy) -> int:
        """Apply a new policy between blocks; moves only the weights whose tier changes (a change of
        weight compression switches to the other weight store and re-places everything)."""
        same_store = (policy.compress_weight == self.policy.compress_weight and
                      (not policy.compress_weight or policy.compression == self.policy.compression))
        store = self.weights.store if same_store else self._open_store(policy)
        check_budgets(self.config, store, policy, self.device, self.dtype, self.gpu_mem_gib,
                      self.cpu_mem_gib, prompt_len=None, gen_len=None,
                      resident_ram_bytes=self.weights.ram_bytes())
        if same_store:
            moved = self.weights.replace(policy)
        else:
            self.weights = PlacedWeights(store, self.config, policy, self.device, self.dtype, self.disk,
                                         self.transfers)
            moved = sum(e.nbytes for entries in store.layers.values() for e in entries)
        self.policy = policy
        return moved

    def generate(self, rows: list[RowInput], params: GenerationParams, *,
                 on_step: Callable[[StepUpdate], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[RowResult]:
        """Generate for every row, block by block; results are in the order of `rows`."""
        check_lengths(self.config, rows, params)
        stop_ids = set(params.stop_token_ids or self.config.eos_token_ids)
        results = [RowResult(row_id=r.row_id, generated_ids=list(r.generated_ids)) for r in rows]
        pending = []
        for row, res in zip(rows, results):
            if not row.prompt_ids:
                raise PromptTooLongError(f"row {row.row_id}: empty prompt (no tokens)", hint="every prompt "
                                         "needs at least one token (OPT's BOS is added by the tokenizer)")
            if res.generated_ids and res.generated_ids[-1] in stop_ids:
                res.finish_reason = "stop"
            elif len(res.generated_ids) >= params.max_new_tokens:
                res.finish_reason = "length"
            else:
                pending.append(BlockRow(result=res, context_ids=list(row.prompt_ids) + list(row.generated_ids),
                                        max_new_tokens=params.max_new_tokens, prompt_len=len(row.prompt_ids)))
        block = self.policy.block_size
        with self.rss:
            for index in range(0, len(pending), block):
                if self._run_block(pending[index:index + block], params, stop_ids, index // block,
                                   on_step, should_stop):
                    break
        return results

    def _run_block(self, rows: list[BlockRow], params, stop_ids, block_index, on_step, should_stop) -> bool:
        prompt_len = max(len(r.context_ids) for r in rows)
        gen_len = max(r.max_new_tokens - len(r.result.generated_ids) for r in rows)
        est = check_budgets(self.config, self.weights.store, self.policy, self.device, self.dtype,
                            self.gpu_mem_gib, self.cpu_mem_gib, prompt_len=prompt_len, gen_len=gen_len,
                            resident_ram_bytes=self.weights.ram_bytes())
        configure_allocator(freed_bytes_to_keep(est, self.cpu_mem_gib))
        ctx = ScheduleContext(self.config, self.policy, self.device, self.dtype, self.weights, self.disk,
                              self.transfers, self._io if self.policy.overlap else None)
        workdir = Path(tempfile.mkdtemp(prefix="block-", dir=self.offload_dir))
        already = sum(len(r.result.generated_ids) for r in rows)
        started = time.perf_counter()
        first_step_s = []

        def step_hook(update: StepUpdate) -> None:
            if update.step == 0:
                first_step_s.append(update.elapsed_s)
            if on_step:
                on_step(update)

        try:
            stopped = BlockRunner(ctx, rows, workdir).run(params, stop_ids, block_index, step_hook, should_stop)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self.stats.record_block(rows=len(rows), prompt_tokens=sum(len(r.context_ids) for r in rows),
                                generated_tokens=sum(len(r.result.generated_ids) for r in rows) - already,
                                prefill_s=first_step_s[0] if first_step_s else 0.0,
                                total_s=time.perf_counter() - started,
                                transfers=self.transfers.snapshot_and_reset(),
                                peak_rss=self.rss.peak, device=self.device,
                                throttled=bool(self.disk.throttle_gbps))
        return stopped

    def close(self) -> None:
        self._io.shutdown(wait=True)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
