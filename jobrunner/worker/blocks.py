"""One leased shard, block by block: prepare rows, generate, write a part, commit, save progress.

Order of durable steps for a block (why a crash anywhere loses nothing and duplicates nothing):
  1. every N decode steps: save the generated ids of the rows in flight (KV-free progress);
  2. block done: encode its rows as a Parquet part in memory;
  3. commit: store the part's bytes, register it and advance the shard in one transaction, fenced
     by attempt.
A crash before 3 commits leaves nothing behind; the next attempt re-prefills the saved ids
and continues, and since sampling is a pure function of (seed, row, position), it produces the
same tokens the dead worker would have. Crash tests fault the run at named points (fault_hooks).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Callable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import Engine as StoreEngine

from engine.runtime.rows import GenerationParams, RowInput, RowResult, StepUpdate
from jobrunner import store
from jobrunner.io.enqueue import JobParams
from jobrunner.store.models import Job
from jobrunner.errors import UserError
from jobrunner.io.inputs import InputRow, read_rows
from jobrunner.io.shard_inputs import id_type_of, read_shard_rows
from jobrunner.io.parts import ResultRow, part_name, rows_to_table, to_parquet_bytes
from jobrunner.store import EventKind, Lease, LeaseLost, PartRecord, RowProgress
from jobrunner.worker.disk_full import disk_full_cause
from jobrunner.worker.fault_hooks import kill_point, raise_if_poisoned
from jobrunner.worker.store_retry import TRANSIENT, StoreRetry

if TYPE_CHECKING:  # the engine (torch) is imported when the worker loads a model, not before
    from engine.runtime.engine import Engine

RETRY_BACKOFF_S = (0.5, 2.0)  # waits before the 2nd and 3rd try of a block that crashed the engine


class ShardOutcome(str, enum.Enum):
    DONE = "done"            # every row of the shard is committed
    STOPPED = "stopped"      # should_stop fired: progress kept in memory for the worker to save or drop
    FAILED = "failed"        # the job failed, or the shard crashed and was released for a retry
    DISK_FULL = "disk_full"  # the disk tier filled up: progress saved, the shard released
    LOST = "lost"            # the lease was taken over: nothing more may be written
    CANCELLED = "cancelled"  # the job was cancelled; rows in flight were saved, the shard released


class ShardReporter(Protocol):
    """Where a shard's progress goes (log lines, a live progress bar)."""

    def message(self, text: str) -> None: ...

    def shard_started(self, *, job: Job, lease: Lease, rows: int, already_done: int,
                      resumed_tokens: int) -> None: ...

    def step(self, *, new_tokens: int) -> None: ...

    def block_committed(self, *, rows: int, failed: int, tokens: int, seconds: float) -> None: ...


@dataclass
class PreparedRow:
    input: InputRow
    prompt_ids: tuple[int, ...] = ()
    error: str | None = None  # a row problem: the row becomes an error row without the engine

    @property
    def row(self) -> int:
        return self.input.row


@dataclass
class ShardContext:
    """What running one shard needs from the worker (the worker owns the engine and the lease)."""
    db: StoreEngine
    job: Job
    lease: Lease
    engine: Engine
    params: JobParams
    gen_params: GenerationParams
    progress_every: int             # save KV-free progress every N decode steps
    should_stop: Callable[[], bool]
    reporter: ShardReporter
    store_call: StoreRetry          # every store call goes through it: a dropped connection is retried
    id_type: pa.DataType | None = None  # the type of the job's id column, if it has one (set by run_shard)
    progress: dict[int, RowProgress] = field(default_factory=dict)
    blocks_written: int = 0
    engine_parts_written: int = 0     # parts with generated rows (the crash-test hooks aim at the first)
    between_blocks: Callable[[], None] | None = None  # re-planning hook, at block boundaries


def generation_params(params: JobParams, tokenizer, eos_token_ids: tuple[int, ...]) -> GenerationParams:
    """The model's EOS ids stop a row; stop strings that are one token also stop generation early;
    all are cut from the text."""
    stop_ids = set(eos_token_ids)
    for text in params.stop:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) == 1:
            stop_ids.add(ids[0])
    return GenerationParams(max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                            top_p=params.top_p, seed=params.seed, stop_token_ids=tuple(sorted(stop_ids)))


def prepare_rows(rows: list[InputRow], tokenizer, params: JobParams, max_positions: int) -> list[PreparedRow]:
    prepared = [PreparedRow(input=r, error=r.problem) for r in rows]
    todo = [p for p in prepared if p.error is None]
    if not todo:
        return prepared
    encoded = tokenizer([p.input.prompt for p in todo]).input_ids
    room = max_positions - params.max_new_tokens
    for p, ids in zip(todo, encoded):
        if len(ids) > room:
            if params.truncate == "left":
                ids = ids[:1] + ids[len(ids) - room + 1:]  # keep BOS and the end of the prompt
            else:
                p.error = (f"prompt is too long: {len(ids)} tokens + {params.max_new_tokens} new tokens "
                           f"exceed the model's {max_positions} positions")
                continue
        p.prompt_ids = tuple(ids)
    return prepared


def _now() -> datetime:
    return datetime.now(UTC)


def _error_result(p: PreparedRow, ctx: ShardContext, message: str) -> ResultRow:
    return ResultRow(row=p.row, id=p.input.id, prompt=p.input.prompt, completion=None, completion_tokens=0,
                     prompt_tokens=len(p.prompt_ids), finish_reason="error", error=message,
                     attempt=ctx.lease.attempt, block_seconds=0.0, finished_at=_now())


def _finished_result(p: PreparedRow, res: RowResult, ctx: ShardContext, seconds: float) -> ResultRow:
    tok = ctx.engine.tokenizer
    text = tok.decode(res.generated_ids, skip_special_tokens=True)
    reason = res.finish_reason
    cuts = [i for i in (text.find(s) for s in ctx.params.stop) if i >= 0]
    if cuts:
        text, reason = text[:min(cuts)], "stop"
    return ResultRow(row=p.row, id=p.input.id, prompt=p.input.prompt, completion=text,
                     completion_tokens=len(res.generated_ids), prompt_tokens=len(p.prompt_ids),
                     finish_reason=reason, error=None, attempt=ctx.lease.attempt, block_seconds=seconds,
                     finished_at=_now())


def _last_block_stats(engine: Engine) -> dict | None:
    blocks = engine.stats.blocks
    if not blocks:
        return None
    b = blocks[-1]
    return {"peak_rss_bytes": b.peak_rss_bytes, "peak_gpu_bytes": b.peak_gpu_bytes, "prefill_s": b.prefill_s,
            "transfers": {link: [nbytes, secs] for link, (nbytes, secs) in b.transfers.items()}}


def commit_rows(ctx: ShardContext, results: list[ResultRow], *, seconds: float, tokens: int) -> bool:
    """Write one part and register it; returns True when the shard is complete."""
    results = sorted(results, key=lambda r: r.row)
    table = rows_to_table(results, ctx.id_type)
    first_engine_part = ctx.engine_parts_written == 0 and tokens > 0
    name = part_name(ctx.lease.shard_index, ctx.lease.attempt, ctx.blocks_written)
    encoded = to_parquet_bytes(table)
    ctx.blocks_written += 1
    ctx.engine_parts_written += tokens > 0
    if first_engine_part:
        kill_point("before_commit")
    done = ctx.store_call(store.commit_block, ctx.db, ctx.lease, PartRecord(
        path=name, data=encoded.data, row_ids=tuple(r.row for r in results),
        failed_rows=sum(r.finish_reason == "error" for r in results), generated_tokens=tokens,
        size_bytes=len(encoded.data), sha256=encoded.sha256, block_seconds=seconds,
        engine_stats=_last_block_stats(ctx.engine) if tokens else None),
        before_commit=(lambda: kill_point("during_commit")) if first_engine_part else None)
    for r in results:
        ctx.progress.pop(r.row, None)
    ctx.reporter.block_committed(rows=len(results), failed=sum(r.finish_reason == "error" for r in results),
                                 tokens=tokens, seconds=seconds)
    return done


def shard_rows(ctx: ShardContext) -> tuple[list[InputRow], pa.DataType | None]:
    """The lease's input rows and the type of the job's id column (None without one): from the
    store, or from the input file for a job that reads it."""
    job, lease = ctx.job, ctx.lease
    if not job.inputs_in_store:
        id_type = pq.ParquetFile(job.input_path).schema_arrow.field(job.id_column).type if job.id_column else None
        return read_rows(job.input_path, job.prompt_column, job.id_column, lease.row_start, lease.row_end), id_type
    stored = ctx.store_call(store.shard_input, ctx.db, lease.shard_id)
    if stored is None:
        raise UserError(f"job {job.id}: shard {lease.shard_index} has no stored prompts",
                        "enqueue the input file again")
    rows = read_shard_rows(*stored, row_start=lease.row_start, row_end=lease.row_end,
                           where=f"job {job.id} shard {lease.shard_index}")
    return rows, id_type_of(stored[0])


def run_shard(ctx: ShardContext) -> ShardOutcome:
    """Process the lease's remaining rows: DONE, or STOPPED when should_stop fired (the caller
    decides between saving progress and abandoning the lease)."""
    job, lease = ctx.job, ctx.lease
    done_rows = ctx.store_call(store.committed_rows, ctx.db, lease.shard_id)
    saved = ctx.store_call(store.load_progress, ctx.db, lease.shard_id)
    ctx.progress = {r: p for r, p in saved.items() if r not in done_rows}
    rows, ctx.id_type = shard_rows(ctx)
    inputs = [r for r in rows if r.row not in done_rows]
    ctx.reporter.shard_started(job=job, lease=lease, rows=len(inputs), already_done=len(done_rows),
                               resumed_tokens=sum(len(p.ids) for p in ctx.progress.values()))
    if ctx.progress:
        ctx.store_call(store.record_event, ctx.db, EventKind.SHARD_RESUMED, job_id=job.id, shard_id=lease.shard_id,
                       worker_id=lease.worker_id,
                       data={"rows": len(ctx.progress), "tokens": sum(len(p.ids) for p in ctx.progress.values()),
                             "attempt": lease.attempt})
    prepared = prepare_rows(inputs, ctx.engine.tokenizer, ctx.params, ctx.engine.config.max_positions)
    errors = [p for p in prepared if p.error is not None]
    if errors and commit_rows(ctx, [_error_result(p, ctx, p.error) for p in errors], seconds=0.0, tokens=0):
        return ShardOutcome.DONE
    todo = [p for p in prepared if p.error is None]
    # Similar lengths together cut padding; the key is deterministic, outputs keep input order.
    todo.sort(key=lambda p: (len(p.prompt_ids) + len(ctx.progress.get(p.row, RowProgress(ids=())).ids), p.row))
    index = 0
    while index < len(todo):
        if ctx.between_blocks is not None:
            ctx.between_blocks()
        block = todo[index:index + ctx.engine.policy.block_size]
        if run_block(ctx, block) is ShardOutcome.STOPPED:
            return ShardOutcome.STOPPED
        index += len(block)
    return ShardOutcome.DONE


def run_block(ctx: ShardContext, block: list[PreparedRow]) -> ShardOutcome:
    started = time.perf_counter()
    resumed_tokens = {p.row: len(ctx.progress.get(p.row, RowProgress(ids=())).ids) for p in block}
    outcome = _generate_isolating(ctx, block)
    if outcome is None:
        return ShardOutcome.STOPPED
    seconds = time.perf_counter() - started
    # Save the finished rows too: a crash while writing or committing the part then redoes nothing.
    save_progress(ctx, [r for r in outcome.values() if not isinstance(r, str)], step=-1)
    results, tokens = [], 0
    for p in block:
        res = outcome[p.row]
        if isinstance(res, str):
            results.append(_error_result(p, ctx, res))
        else:
            tokens += len(res.generated_ids) - resumed_tokens[p.row]
            results.append(_finished_result(p, res, ctx, seconds))
    commit_rows(ctx, results, seconds=seconds, tokens=max(tokens, 0))
    return ShardOutcome.DONE


def _generate_isolating(ctx: ShardContext, block: list[PreparedRow]) -> dict[int, RowResult | str] | None:
    """Generate a block; if the engine crashes, retry with backoff, then bisect to isolate the
    poison row(s), which become error rows. None when stopped (signal, cancel, lost lease)."""
    last_error: Exception | None = None
    for try_index in range(len(RETRY_BACKOFF_S) + 1 if len(block) > 1 else 1):
        if try_index:
            time.sleep(RETRY_BACKOFF_S[try_index - 1])
        if ctx.should_stop():
            return None
        try:
            results = _generate(ctx, block)
        except (LeaseLost, *TRANSIENT):
            raise  # a progress save found the shard taken over, or the store gone: not the engine's fault
        except Exception as exc:  # noqa: BLE001 - any engine crash: retry, then isolate
            full = disk_full_cause(exc, ctx.engine.offload_dir)
            if full is not None:
                raise full from exc  # the machine's disk, not the rows: the worker backs off
            last_error = exc
            ctx.store_call(store.record_event, ctx.db, EventKind.ENGINE_ERROR, job_id=ctx.job.id,
                           shard_id=ctx.lease.shard_id, worker_id=ctx.lease.worker_id,
                           message=f"{type(exc).__name__}: {exc}",
                           data={"rows": [p.row for p in block], "try": try_index + 1})
            continue
        if any(not r.finished for r in results):
            return None
        return {p.row: r for p, r in zip(block, results)}
    if len(block) == 1:
        return {block[0].row: f"engine error: {type(last_error).__name__}: {last_error}"}
    half = len(block) // 2
    merged: dict[int, RowResult | str] = {}
    for part in (block[:half], block[half:]):
        got = _generate_isolating(ctx, part)
        if got is None:
            return None
        merged.update(got)
    return merged


def _generate(ctx: ShardContext, block: list[PreparedRow]) -> list[RowResult]:
    raise_if_poisoned(p.row for p in block)
    rows = [RowInput(row_id=p.row, prompt_ids=p.prompt_ids,
                     generated_ids=ctx.progress.get(p.row, RowProgress(ids=())).ids) for p in block]

    def on_step(update: StepUpdate) -> None:
        ctx.reporter.step(new_tokens=update.new_tokens)
        if update.step == 0:
            kill_point("prefill")
        kill_point("decode", update.step)
        if update.step > 0 and update.step % ctx.progress_every == 0:
            save_progress(ctx, update.rows, update.step)
            kill_point("after_progress")

    results = ctx.engine.generate(rows, ctx.gen_params, on_step=on_step, should_stop=ctx.should_stop)
    if any(not r.finished for r in results):
        _remember(ctx, results)  # the worker saves these when it stops gracefully
    return results


def _remember(ctx: ShardContext, rows: list[RowResult]) -> None:
    for r in rows:
        if r.generated_ids:
            ctx.progress[r.row_id] = RowProgress(ids=tuple(r.generated_ids), finish=r.finish_reason)


def save_progress(ctx: ShardContext, live_rows: list[RowResult], step: int) -> None:
    _remember(ctx, live_rows)
    ctx.store_call(store.save_progress, ctx.db, ctx.lease, dict(ctx.progress), decode_step=step)
