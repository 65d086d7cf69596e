"""`flexjob work`: the long-running worker loop.

    declare this host's dead workers dead ─▶ claim a shard ─▶ check input and model fingerprints
        ─▶ engine for (model, dtype) ─▶ heartbeat thread renews the lease ─▶ run_shard (blocks) ─▶ next

Before each claim, workers of this host whose process is gone are declared dead (liveness), so
their shards are claimed at once rather than when their leases run out. With --exit-when-idle the
worker stops only when nothing is left that it could take: it waits for shards whose holders stopped
renewing, and leaves those of live workers alone.

SIGTERM/SIGINT set a flag that the engine polls at every step boundary (should_stop): the worker
saves the generated ids of the rows in flight, releases its lease and exits. A cancel (seen at the
heartbeat) stops the shard the same way and saves too, so `flexjob retry` resumes those rows; a
lost lease (the heartbeat found the shard taken over) stops it without a save: it is not ours.
Every store call goes through StoreRetry: a dropped connection is retried, not a failed shard.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from sqlalchemy import Engine as StoreEngine

from engine.planning.hardware import HardwareProfile
from engine.planning.profile_store import DiskBandwidthLearner
from engine.runtime.paths import engine_home
from engine.runtime.policy import Policy
from jobrunner import store
from jobrunner.errors import UserError
from jobrunner.io.enqueue import JobParams, model_fingerprint
from jobrunner.io.inputs import fingerprint_file
from jobrunner.store import EventKind, Lease, LeaseLost
from jobrunner.worker.blocks import ShardContext, ShardOutcome, generation_params, run_shard
from jobrunner.worker.disk_full import DiskFull, DiskFullBackoff, disk_full_cause
from jobrunner.worker.host_locks import DeviceLock, exclusive
from jobrunner.worker.lease_keeper import LeaseKeeper
from jobrunner.store.models import Job, ShardStatus, utcnow
from jobrunner.worker.liveness import describe_wait, holder_is_live, host_id, process_start_time, take_over_dead
from jobrunner.worker.replan import stored_profile_path
from jobrunner.worker.reporter import PlainReporter, WorkerReporter
from jobrunner.worker.store_retry import StoreRetry

if TYPE_CHECKING:  # the engine (torch) and the planner load when needed, not at start
    from engine.runtime.engine import Engine
    from jobrunner.worker.bandwidth_monitor import ReplanDecision

# Called at block boundaries with the engine; a decision means: switch to its policy now.
Replanner = Callable[["Engine"], "ReplanDecision | None"]


SHARD_RETRY_AFTER_S = 5.0  # a shard whose run crashed is claimable again after this


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    policy: Policy | None = None       # None: planned from `hardware` if given, else Policy()
    hardware: HardwareProfile | None = None
    gpu_mem_gib: float | None = None
    cpu_mem_gib: float | None = None
    offload_dir: Path = field(default_factory=engine_home)
    exit_when_idle: bool = False
    max_jobs: int | None = None
    lease_s: float = 60.0
    heartbeat_s: float | None = None   # default: a quarter of the lease
    progress_every: int = 16           # decode steps between KV-free progress saves
    idle_poll_s: float = 2.0
    device_lock: str | None = None     # e.g. "cuda-GPU-<uuid>": one worker per GPU
    throttle_gbps: dict[str, float] | None = None  # cap engine links (tests and benchmarks of re-planning)


@dataclass(frozen=True, kw_only=True)
class WorkerSummary:
    shards_done: int
    rows_done: int
    tokens: int
    stopped_by: str  # "idle" | "signal" | "max-jobs"


class Worker:
    def __init__(self, db: StoreEngine, config: WorkerConfig, *, reporter: WorkerReporter | None = None,
                 replanner: Replanner | None = None) -> None:
        self.db, self.config = db, config
        self.reporter: WorkerReporter = reporter or PlainReporter()
        self._call = StoreRetry(budget_s=config.lease_s, report=self.reporter.message)
        self.replanner = replanner
        self._learner = DiskBandwidthLearner(config.offload_dir)  # the profile learns what blocks saw
        self.stop_signal: int | None = None
        self._wake = threading.Event()
        self._engine = None
        self._engine_key: tuple[str, str] | None = None
        self._model_fingerprints: dict[str, str] = {}
        self.worker_id: str | None = None
        self._shards_done = 0
        self._start = (0, 0)  # the reporter's rows and tokens when the loop started
        self._announced_waits: set[tuple] = set()  # shards this worker said it waits for
        self._disk_backoff = DiskFullBackoff()

    # -- signals --------------------------------------------------------------------------
    def _on_signal(self, signum, _frame) -> None:
        if self.stop_signal is not None:  # a second signal: stop waiting politely
            raise KeyboardInterrupt
        self.stop_signal = signum
        self._wake.set()
        self.reporter.message(f"{signal.Signals(signum).name}: saving progress and releasing the lease")

    def _install_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> WorkerSummary:
        lock = DeviceLock(self.config.device_lock) if self.config.device_lock else None
        if lock:
            lock.acquire()
        previous = self._install_signals()
        self.worker_id = self._call(
            store.register_worker, self.db, device=self._device_name(),
            policy=self.config.policy.to_dict() if self.config.policy else None,
            host_id=host_id(), process_started_at=process_start_time(os.getpid()),
            profile_path=stored_profile_path(self.config.offload_dir))
        self.reporter.message(f"worker {self.worker_id} started")
        self._start = (self.reporter.rows, self.reporter.tokens)
        stopped_by = "signal"
        try:
            stopped_by = self._claim_loop()
        finally:
            self._call(store.stop_worker, self.db, self.worker_id, reason=stopped_by)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._engine is not None:
                self._engine.close()
            if lock:
                lock.release()
            self.reporter.close()
        return WorkerSummary(shards_done=self._shards_done, rows_done=self.reporter.rows - self._start[0],
                             tokens=self.reporter.tokens - self._start[1], stopped_by=stopped_by)

    def _claim_loop(self) -> str:
        """Claim and run shards until a signal, --max-jobs, or (with --exit-when-idle) nothing is
        left that this worker could ever take. Returns why it stopped."""
        jobs_seen: set[int] = set()
        while self.stop_signal is None:
            self._take_over_dead_workers()
            lease = self._call(store.claim_shard, self.db, self.worker_id, lease_s=self.config.lease_s)
            if lease is None:
                if self.config.exit_when_idle and not self._work_left():
                    return "idle"
                self._call(store.worker_seen, self.db, self.worker_id)  # idle, not dead: keep the heartbeat fresh
                self._wake.wait(self.config.idle_poll_s)
                continue
            if self.config.max_jobs is not None and lease.job_id not in jobs_seen \
                    and len(jobs_seen) >= self.config.max_jobs:
                self._call(store.release_shard, self.db, lease, reason="worker reached --max-jobs")
                return "max-jobs"
            jobs_seen.add(lease.job_id)
            outcome = self._work_on(lease)
            if outcome is ShardOutcome.DISK_FULL:
                self._wake.wait(self._disk_backoff.next_wait())
            elif outcome is ShardOutcome.DONE:
                self._shards_done += 1
                self._disk_backoff.reset()
        return "signal"

    def _take_over_dead_workers(self) -> None:
        for dead, freed in self._call(take_over_dead, self.db, self.worker_id):
            self.reporter.message(f"worker {dead.id} is dead (process {dead.pid} is gone)"
                                  + (f"; its {len(freed)} shard(s) are taken over now" if freed else ""))

    def _work_left(self) -> bool:
        """Whether a shard not claimable now will be: one waiting out a retry delay, or one held by a
        worker that is not renewing its lease. Shards of live workers are theirs to finish."""
        now = utcnow()
        waiting = [h for h in self._call(store.held_elsewhere, self.db, self.worker_id, now=now)
                   if h.status == ShardStatus.PENDING or not holder_is_live(h, now)]
        for held in waiting:
            key = (held.job_id, held.shard_index, held.worker_id)
            if key not in self._announced_waits:
                self._announced_waits.add(key)
                self.reporter.message(f"waiting: {describe_wait(held, now)}")
        return bool(waiting)

    def _device_name(self) -> str:
        import torch
        return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"

    def _work_on(self, lease: Lease) -> ShardOutcome:
        job = self._call(store.get_job, self.db, lease.job_id)
        problem = self._changed_since_enqueue(job)
        if problem:
            self.reporter.message(f"job {job.id} failed: {problem}")
            self._call(store.fail_job_for_lease, self.db, lease, problem)
            return ShardOutcome.FAILED
        params = JobParams.from_dict(job.params)
        try:
            engine = self._engine_for(job, params)
        except DiskFull as exc:
            return self._step_back_for_disk(lease, exc, progress={})
        except BaseException:
            self._call(store.release_shard, self.db, lease, reason="worker could not load the model")
            raise
        keeper = LeaseKeeper(self.db, lease, lease_s=self.config.lease_s,
                             interval_s=self.config.heartbeat_s or self.config.lease_s / 4)
        keeper.start()
        ctx = ShardContext(db=self.db, job=job, lease=lease, engine=engine, params=params,
                           gen_params=generation_params(params, engine.tokenizer, engine.config.eos_token_ids),
                           progress_every=self.config.progress_every,
                           should_stop=lambda: self.stop_signal is not None or keeper.interrupted(),
                           reporter=self.reporter, store_call=self._call,
                           between_blocks=lambda: self._between_blocks(engine, lease))
        try:
            outcome = self._run_guarded(ctx)
        finally:
            keeper.stop()
            self._learner.observe(engine.stats)
        return self._after_stop(ctx, keeper) if outcome is ShardOutcome.STOPPED else outcome

    def _run_guarded(self, ctx: ShardContext) -> ShardOutcome:
        """run_shard, with what can go wrong turned into an outcome (and the lease handled)."""
        job, lease = ctx.job, ctx.lease
        try:
            return run_shard(ctx)
        except LeaseLost as exc:
            self.reporter.message(f"lease lost: {exc}")
            return ShardOutcome.LOST
        except DiskFull as exc:
            return self._step_back_for_disk(lease, exc, progress=ctx.progress)
        except UserError as exc:  # the input no longer matches the job (e.g. rows missing)
            self.reporter.message(f"job {job.id} failed: {exc}")
            self._fail_quietly(lease, str(exc))
            return ShardOutcome.FAILED
        except Exception as exc:  # noqa: BLE001 - a bug or a broken host: retry later, elsewhere
            full = disk_full_cause(exc, Path(self.config.offload_dir))
            if full is not None:
                return self._step_back_for_disk(lease, full, progress=ctx.progress)
            traceback.print_exc(file=sys.stderr)
            self.reporter.message(f"shard {lease.shard_index} of job {job.id} crashed: {type(exc).__name__}: {exc}")
            self._release_quietly(lease, reason="crashed", error=f"{type(exc).__name__}: {exc}",
                                  retry_after_s=SHARD_RETRY_AFTER_S)
            return ShardOutcome.FAILED

    def _after_stop(self, ctx: ShardContext, keeper: LeaseKeeper) -> ShardOutcome:
        """The shard stopped before its end: a lost lease is dropped; a cancel or a signal saves the
        rows in flight (a retry or the next claim resumes them) and releases the shard."""
        job, lease = ctx.job, ctx.lease
        if keeper.lost.is_set():
            self.reporter.message(f"lease on shard {lease.shard_index} of job {job.id} was taken over; dropping it")
            return ShardOutcome.LOST
        cancelled = keeper.cancelled.is_set()
        try:
            self._call(store.save_progress, self.db, lease, dict(ctx.progress), decode_step=-1)
        except LeaseLost:
            return ShardOutcome.LOST
        self._release_quietly(lease, reason="job cancelled" if cancelled else "worker stopped by signal")
        saved = sum(len(p.ids) for p in ctx.progress.values())
        if cancelled:
            self.reporter.message(f"job {job.id} was cancelled; saved {saved} generated tokens of "
                                  f"{len(ctx.progress)} rows for a retry; released shard {lease.shard_index}")
            return ShardOutcome.CANCELLED
        self.reporter.message(f"saved {saved} generated tokens of {len(ctx.progress)} rows; lease released")
        return ShardOutcome.STOPPED

    def _step_back_for_disk(self, lease: Lease, full: DiskFull, *, progress: dict) -> ShardOutcome:
        """Save the rows in flight, release the shard and say so; the claim loop then backs off."""
        wait_s = self._disk_backoff.peek()
        self.reporter.message(f"{full}; shard {lease.shard_index} released, retrying in {wait_s:.0f} s")
        self._call(store.record_event, self.db, EventKind.DISK_FULL, job_id=lease.job_id, shard_id=lease.shard_id,
                   worker_id=self.worker_id, message=str(full),
                   data={"directory": str(full.directory), "free_bytes": full.free_bytes, "retry_in_s": wait_s})
        try:
            if progress:
                self._call(store.save_progress, self.db, lease, dict(progress), decode_step=-1)
            self._call(store.release_shard, self.db, lease, reason="disk full")
        except LeaseLost:
            return ShardOutcome.LOST
        return ShardOutcome.DISK_FULL

    def _fail_quietly(self, lease: Lease, error: str) -> None:
        try:
            self._call(store.fail_job_for_lease, self.db, lease, error)
        except LeaseLost:
            pass

    def _release_quietly(self, lease: Lease, **kwargs) -> None:
        try:
            self._call(store.release_shard, self.db, lease, **kwargs)
        except LeaseLost:
            pass

    def _changed_since_enqueue(self, job: Job) -> str | None:
        return (None if job.inputs_in_store else self._input_file_changed(job)) or self._model_changed(job)

    @staticmethod
    def _input_file_changed(job: Job) -> str | None:
        path = Path(job.input_path)
        if not path.is_file():
            return f"input file {path} no longer exists"
        stat = path.stat()
        if (stat.st_size, stat.st_mtime_ns) != (job.input_size, job.input_mtime_ns):
            if fingerprint_file(path) != job.input_fingerprint:
                return (f"input file {path} changed after enqueue (its content no longer matches); "
                        f"restore it and run `flexjob retry {job.id}`, or enqueue the new file")
        return None

    def _model_changed(self, job: Job) -> str | None:
        if not Path(job.model_dir).is_dir():
            return f"model directory {job.model_dir} no longer exists"
        if job.model_dir not in self._model_fingerprints:
            self._model_fingerprints[job.model_dir] = model_fingerprint(job.model_dir)
        if self._model_fingerprints[job.model_dir] != job.model_fingerprint:
            return f"model directory {job.model_dir} changed after enqueue"
        return None

    def _engine_for(self, job: Job, params: JobParams):
        from engine.runtime.engine import Engine

        key = (job.model_dir, params.dtype)
        if self._engine_key != key:
            if self._engine is not None:
                self._engine.close()
                self._engine = None
            policy = self._policy_for(job, params)
            self.reporter.message(f"loading {job.model_dir} ({params.dtype}, policy {policy.describe()})")
            # Workers sharing a disk directory would convert the checkpoint into the same weight
            # store files at once; one at a time, the second finds the store complete.
            with exclusive(Path(self.config.offload_dir) / "flexjob-engine-load.lock"):
                try:
                    self._engine = Engine(job.model_dir, policy, dtype=params.dtype,
                                          offload_dir=self.config.offload_dir, gpu_mem_gib=self.config.gpu_mem_gib,
                                          cpu_mem_gib=self.config.cpu_mem_gib,
                                          throttle_gbps=self.config.throttle_gbps)
                except Exception as exc:
                    full = disk_full_cause(exc, Path(self.config.offload_dir))
                    if full is None:
                        raise
                    raise full from exc
            self._engine_key = key
            self._call(store.worker_seen, self.db, self.worker_id, policy=policy.to_dict())
        return self._engine

    def _policy_for(self, job: Job, params: JobParams) -> Policy:
        if self.config.policy is not None:
            return self.config.policy
        if self.config.hardware is None:
            return Policy()
        from engine.model.config import load_config
        from jobrunner.worker.replan import plan_for_this_process  # the planner (pulp) loads only when it plans

        return plan_for_this_process(load_config(job.model_dir), self.config.hardware,
                                     gpu_mem_gib=self.config.gpu_mem_gib, cpu_mem_gib=self.config.cpu_mem_gib,
                                     gen_len=params.max_new_tokens,
                                     # a block bigger than a shard would hold rows it never gets
                                     max_block_size=job.shard_rows).policy

    def _between_blocks(self, engine: Engine, lease: Lease) -> None:
        """Learn the disk bandwidth the finished blocks saw (the stored profile), then maybe re-plan."""
        self._learner.observe(engine.stats)
        self._maybe_replan(engine, lease)

    def _maybe_replan(self, engine: Engine, lease: Lease) -> None:
        if self.replanner is None:
            return
        decision = self.replanner(engine)
        if decision is None or decision.new_policy == engine.policy:
            return
        old, new = engine.policy, decision.new_policy
        engine.set_policy(new)
        self._call(store.worker_seen, self.db, self.worker_id, policy=new.to_dict())
        self._call(store.record_event, self.db, EventKind.REPLAN, job_id=lease.job_id, shard_id=lease.shard_id,
                           worker_id=self.worker_id, message=f"{old.describe()} -> {new.describe()}",
                           data=decision.to_event())
        self.reporter.message(f"re-planned: {old.describe()} -> {new.describe()}")
