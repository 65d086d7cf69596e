"""Concurrent claimers, for the claim-throughput benchmark and the no-double-claim test.

Each claimer is a process that registers as a worker, waits for the common start, then loops:
claim a shard with the store's claim_shard (the worker's own call), complete it with commit_block
and a tiny part naming the shard's rows, until no shard is left. Store errors the worker retries
(a lost connection, a deadlock the server broke) are retried the same way, and counted. It logs every (shard, attempt) it
was granted, so a double claim shows twice: once in the logs, once in the shard's attempt count.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import queue
import time
from collections import Counter
from dataclasses import dataclass

LEASE_S = 600.0  # no lease runs out during a run: any second claim of a shard is a double claim


@dataclass(frozen=True, kw_only=True)
class ClaimLog:
    claimer: int
    claims: tuple[tuple[int, int], ...]   # (shard id, attempt), in claim order
    claim_ms: tuple[float, ...]           # claim + commit, each
    retried: tuple[str, ...] = ()         # store errors retried as the worker retries them (e.g. a deadlock)


@dataclass(frozen=True, kw_only=True)
class ClaimRun:
    claimers: int
    seconds: float                        # from the common start to the last claimer's end
    logs: tuple[ClaimLog, ...]

    @property
    def claims(self) -> int:
        return sum(len(log.claims) for log in self.logs)

    @property
    def claims_per_s(self) -> float:
        return self.claims / self.seconds

    @property
    def retried(self) -> Counter:
        return Counter(error for log in self.logs for error in log.retried)


def tiny_part(lease):
    """The smallest part commit_block accepts for the lease's rows: a few bytes (claims only)."""
    from jobrunner.store import PartRecord

    data = f"shard {lease.shard_index}".encode()
    return PartRecord(path=f"claims-{lease.shard_index}-{lease.attempt}.parquet", data=data,
                      row_ids=tuple(range(lease.row_start, lease.row_end)), failed_rows=0, generated_tokens=0,
                      size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), block_seconds=0.0)


def _claimer(url: str, index: int, start: mp.Barrier, out: mp.Queue) -> None:
    from jobrunner import store
    from jobrunner.store.db import open_store

    from jobrunner.worker.store_retry import TRANSIENT, StoreRetry

    db = open_store(url, migrate=False)
    worker_id = store.register_worker(db, device=f"claimer-{index}")
    claims, claim_ms, retried = [], [], []
    retry = StoreRetry(budget_s=600.0, report=lambda line: None)  # the worker's retry of store calls

    def counted(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except TRANSIENT as exc:
                retried.append(f"{fn.__name__}: {type(getattr(exc, 'orig', exc)).__name__}")
                raise
        return call

    start.wait()
    while True:
        began = time.perf_counter()
        lease = retry(counted(store.claim_shard), db, worker_id, lease_s=LEASE_S)
        if lease is None:
            break
        retry(counted(store.commit_block), db, lease, tiny_part(lease))
        claim_ms.append((time.perf_counter() - began) * 1000)
        claims.append((lease.shard_id, lease.attempt))
    store.stop_worker(db, worker_id, reason="no shard left")
    out.put(ClaimLog(claimer=index, claims=tuple(claims), claim_ms=tuple(claim_ms), retried=tuple(retried)))


def run_claimers(url: str, claimers: int, *, timeout_s: float = 600.0) -> ClaimRun:
    """`claimers` processes (spawned: no inherited connections) claim the store's shards until none
    is left; timed from their common start."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(claimers + 1), ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(url, i, start, out)) for i in range(claimers)]
    for p in procs:
        p.start()
    start.wait(timeout=timeout_s)  # every claimer has registered: they start together
    began = time.perf_counter()
    logs = _collect(out, procs, time.monotonic() + timeout_s)
    seconds = time.perf_counter() - began
    for p in procs:
        p.join(timeout=60)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"claimers exited with {failed}")
    return ClaimRun(claimers=claimers, seconds=seconds, logs=tuple(sorted(logs, key=lambda log: log.claimer)))


def _collect(out: mp.Queue, procs: list, deadline: float) -> list[ClaimLog]:
    """Every claimer's log; raises as soon as one exits without sending it, or at the deadline."""
    logs: list[ClaimLog] = []
    while len(logs) < len(procs):
        try:
            logs.append(out.get(timeout=1.0))
        except queue.Empty:
            crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if crashed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"claimers failed (exit codes {crashed}) or ran past the deadline")
    return logs


def double_claims(db, job_id: int, run: ClaimRun) -> dict:
    """What shows a shard claimed more than once, or not at all: by the store's attempt counts and
    statuses, and by the claimers' own logs."""
    from jobrunner import store
    from jobrunner.store.models import ShardStatus

    shards = store.list_shards(db, job_id)
    logged = Counter(shard for log in run.logs for shard, _ in log.claims)
    return {"shards": len(shards),
            "attempts_over_1": [s.shard_index for s in shards if s.attempt != 1],
            "not_done": [s.shard_index for s in shards if s.status != ShardStatus.DONE],
            "logged_twice": sorted(shard for shard, n in logged.items() if n > 1),
            "never_logged": sorted({s.id for s in shards} - set(logged)),
            "job_rows_done": store.get_job(db, job_id).done_rows}
