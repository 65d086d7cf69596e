"""A worker outlives a store that drops its connection for a moment: store calls are retried.

A PostgreSQL restart, a failover, a killed backend or a network blip fails the call in flight with
an OperationalError or InterfaceError (the pool drops the dead connection; pre-ping replaces it).
Each store function is one transaction, so calling it again is safe: either the first try did not
commit, or its effect is found again (commit_block recognises its own part; a release or save
whose lease has moved on is refused as LeaseLost, which callers already handle). The worker
retries with a growing backoff until `budget_s` has passed (its lease: beyond that its shard is
another worker's anyway), saying so once per outage, instead of counting the outage as a failure
of the shard.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from jobrunner.errors import StoreUnreachable

P = ParamSpec("P")
R = TypeVar("R")
TRANSIENT = (OperationalError, InterfaceError, StoreUnreachable)  # the last: a drop while opening
BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # then 8 s between tries


@dataclass
class StoreRetry:
    budget_s: float                   # give up (re-raise) after this many seconds of failures
    report: Callable[[str], None]     # one line when an outage starts and when it ends
    sleep: Callable[[float], None] = time.sleep

    def __call__(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        started = time.monotonic()
        tries = 0
        while True:
            try:
                result = fn(*args, **kwargs)
            except TRANSIENT as exc:
                waited = time.monotonic() - started
                if waited >= self.budget_s:
                    raise
                if tries == 0:
                    self.report(f"job store unreachable ({type(exc).__name__}: {_first_line(exc)}); "
                                f"retrying for up to {self.budget_s:.0f} s")
                self.sleep(min(BACKOFF_S[min(tries, len(BACKOFF_S) - 1)], self.budget_s - waited))
                tries += 1
                continue
            if tries:
                self.report(f"job store reachable again after {time.monotonic() - started:.1f} s "
                            f"({tries} retries of {fn.__name__})")
            return result


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
