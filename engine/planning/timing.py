"""Timing a probe: the fastest of repeated calls, and whether the host was too busy to trust it.

A neighbour's work only ever slows a call down, so the fastest of several calls is the figure
closest to what the host can do (min time, hence max bandwidth). How far the median lies above
it (the spread) says how much the host got in the way: on a quiet host a probe's calls agree
within tens of percent; on a 2-core host shared with other jobs the same op-dispatch probe was
seen 100x slower from one run to the next. A LoadWatch collects the spreads of every timing
taken while it is active, the load average seen at its start, and the share of a core a
spinning thread got at its start and end, and judges the host busy. The share is needed
because the spread misses short calls (most of them run between two preemptions) and calls that
a loaded host slows past their allowance (timed twice only); the load average, a minute's mean,
misses a load that just began.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch

MIN_CALLS = 3           # timed calls per probe (after a warm-up call) when the allowance lets them
BUSY_SPREAD = 1.5       # median / fastest call, median over the probes, above which the host is busy
BUSY_LOAD_PER_CORE = 1.0  # 1-minute load average per usable core above which the host is busy
BUSY_CPU_SHARE = 0.6    # share of a core a spinning thread gets below which the host is busy
SHARE_SPIN_S = 0.2      # how long that thread spins


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call of one probe."""
    calls: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.calls)

    @property
    def median(self) -> float:
        return statistics.median(self.calls)

    @property
    def spread(self) -> float:
        """Median over fastest: 1.0 when every call took as long as the fastest."""
        return self.median / self.best if self.best > 0 else 1.0


@dataclass(frozen=True)
class Busy:
    """The verdict on a measurement: whether the host was busy, and what showed it."""
    busy: bool
    load_avg: float   # 1-minute load average when the measurement started
    cores: int        # cores this process may run on
    spread: float     # median over the probes of (median call / fastest call)
    cpu_share: float  # share of a core a spinning thread got (the better of two tries)


@dataclass
class LoadWatch:
    """The timings taken while it is active (see watch_load), and the load when it started."""
    load_avg: float
    cores: int
    cpu_shares: list[float] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)

    def verdict(self) -> Busy:
        spreads = [t.spread for t in self.timings if len(t.calls) >= MIN_CALLS]
        spread = statistics.median(spreads) if spreads else 1.0
        share = max(self.cpu_shares, default=1.0)
        busy = (spread > BUSY_SPREAD or share < BUSY_CPU_SHARE
                or self.load_avg > BUSY_LOAD_PER_CORE * self.cores)
        return Busy(busy=busy, load_avg=self.load_avg, cores=self.cores, spread=spread, cpu_share=share)


_WATCH: contextvars.ContextVar[LoadWatch | None] = contextvars.ContextVar("flexjob_load_watch", default=None)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_share(seconds: float = SHARE_SPIN_S) -> float:
    """The share of one core this thread gets while it spins for `seconds`: near 1 on a quiet
    host, near 1/3 where three runnable threads want each core (a VM's stolen time counts too)."""
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - wall0 < seconds:
        pass
    return (time.thread_time() - cpu0) / (time.perf_counter() - wall0)


@contextlib.contextmanager
def watch_load() -> Iterator[LoadWatch]:
    """Collect every timing taken in this context (this thread) for a busy-host verdict. The load
    average is read first: once the probes run, their own threads add to it. The core share is
    taken before and after (the better counts: kernel threads may still spin after the last probe)."""
    watch = LoadWatch(load_avg=os.getloadavg()[0], cores=usable_cores(), cpu_shares=[cpu_share()])
    token = _WATCH.set(watch)
    try:
        yield watch
        watch.cpu_shares.append(cpu_share())
    finally:
        _WATCH.reset(token)


def record(timing: Timing) -> Timing:
    """Hand a timing to the active LoadWatch, if there is one."""
    watch = _WATCH.get()
    if watch is not None:
        watch.timings.append(timing)
    return timing


def time_calls(fn: Callable[[], object], seconds: float, sync: Callable[[], None] = lambda: None,
               before: Callable[[], object] | None = None) -> Timing:
    """Time calls of fn for about `seconds` (at least MIN_CALLS) after a warm-up call, `before`
    (untimed) ahead of each. When one call takes the whole allowance, the warm-up and one more call
    are all (keeps the profile bounded on slow paths; two calls say nothing of the spread, see
    LoadWatch)."""
    warm_up = _call_seconds(fn, sync, before)
    if warm_up >= seconds:
        return record(Timing((warm_up, _call_seconds(fn, sync, before))))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - start < seconds:
        times.append(_call_seconds(fn, sync, before))
    return record(Timing(tuple(times)))


def _call_seconds(fn: Callable[[], object], sync: Callable[[], None],
                  before: Callable[[], object] | None = None) -> float:
    if before is not None:
        before()
        sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def timed(fn: Callable[[], object], seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds of the fastest call of fn over about `seconds` (see time_calls)."""
    return time_calls(fn, seconds, sync).best


def typical(fn: Callable[[], object], seconds: float, sync: Callable[[], None] = lambda: None,
            before: Callable[[], object] | None = None) -> float:
    """Seconds of the median call of fn over about `seconds` (see time_calls): what a long run of
    such calls averages on this host as it is, where `timed` gives what the host can do at best."""
    return time_calls(fn, seconds, sync, before).median


def best_of(measure: Callable[[], float], repeats: int) -> float:
    """The fewest seconds of `repeats` runs of a probe that times itself (a disk pass, say)."""
    return record(Timing(tuple(measure() for _ in range(repeats)))).best


def sync_for(device: str) -> Callable[[], None]:
    """What waits for the device's queued work: CUDA's synchronize, nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)
