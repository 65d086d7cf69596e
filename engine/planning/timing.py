"""Timing a probe: the median (or fastest) seconds per call over a short allowance."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], seconds: float, sync: Callable[[], None] = lambda: None, *,
          best: bool = False) -> float:
    """Median seconds per call of fn over about `seconds` (at least 3 calls) after a warm-up call;
    the median, because on a shared host a neighbour's burst should not set the figure. `best`:
    the fastest call instead, for figures that are compared with each other (the linear table and
    the engine-layer calibration): measured minutes apart on a busy host, medians of the two were
    seen 2x apart in either direction, fastest calls within 15 %. A call slower than the whole
    allowance is timed once (keeps the profile bounded on slow paths)."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if first >= seconds:
        return first
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def sync_for(device: str) -> Callable[[], None]:
    """What waits for the device's queued work: CUDA's synchronize, nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)
