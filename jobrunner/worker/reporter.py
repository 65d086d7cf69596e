"""What a worker tells its operator: the reporter interface and plain log lines on stderr.

`flexjob work` uses a live progress bar on a terminal (jobrunner.cli) and PlainReporter elsewhere
(systemd, CI, a pipe); both implement WorkerReporter.
"""
from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

from jobrunner.store import Lease
from jobrunner.store.models import Job
from jobrunner.worker.blocks import ShardReporter


class WorkerReporter(ShardReporter, Protocol):
    rows: int      # rows committed so far
    tokens: int    # tokens generated so far

    def close(self) -> None: ...


class PlainReporter:
    """Log lines on stderr (when not on a terminal, e.g. under systemd or in CI)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.rows = self.tokens = 0

    def message(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)

    def shard_started(self, *, job: Job, lease: Lease, rows: int, already_done: int, resumed_tokens: int) -> None:
        resumed = f", resuming {resumed_tokens} saved tokens" if resumed_tokens else ""
        took = " (took over from a dead or expired holder)" if lease.took_over else ""
        self.message(f"job {job.id} shard {lease.shard_index} attempt {lease.attempt}: {rows} rows to do"
                     f"{resumed}{took}")

    def step(self, *, new_tokens: int) -> None:
        self.tokens += new_tokens

    def block_committed(self, *, rows: int, failed: int, tokens: int, seconds: float) -> None:
        self.rows += rows
        rate = f", {tokens / seconds:.1f} tokens/s" if seconds > 0 else ""
        self.message(f"committed {rows} rows ({failed} errors), {tokens} tokens in {seconds:.2f}s{rate}")

    def close(self) -> None:
        pass
