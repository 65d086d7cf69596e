"""Profiling keeps each probe's fastest call and tells a busy host: on a fixed sequence of times,
under a real CPU load from child processes, and in the real profiler's short measurement."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from engine.planning.compute_probes import op_overhead_s
from engine.planning.profile_store import profile_path
from engine.planning.profiler import load_or_measure_profile
from engine.planning.timing import (BUSY_CPU_SHARE, BUSY_LOAD_PER_CORE, BUSY_SPREAD, MIN_CALLS, LoadWatch, Timing,
                                    best_of, time_calls, timed, usable_cores, watch_load)

FAST = dict(disk_bytes=16 * 2 ** 20, seconds_per_test=0.02)
BURN_S = 20  # the children's own limit: they stop by themselves even if the test dies


def test_best_of_keeps_the_fewest_seconds_and_the_watch_sees_the_spread():
    times = iter([3.0, 1.0, 2.0])
    with watch_load() as watch:
        assert best_of(lambda: next(times), 3) == 1.0
    [timing] = watch.timings
    assert timing.best == 1.0 and timing.median == 2.0 and timing.spread == 2.0


def test_timed_keeps_the_fastest_real_call():
    sleeps = iter([0.01, 0.12, 0.03, 0.12])  # a warm-up, then three calls fill the allowance
    with watch_load() as watch:
        best = timed(lambda: time.sleep(next(sleeps)), 0.05)
    assert 0.03 <= best < 0.12
    [timing] = watch.timings
    assert len(timing.calls) == MIN_CALLS and timing.spread > 1.5


def test_what_runs_before_each_call_is_not_timed():
    # The calibration evicts the CPU's caches before each decode call: each call is then timed
    # from DRAM, the eviction's own 50 ms outside it.
    order: list[str] = []
    timing = time_calls(lambda: order.append("call"), 0.01, before=lambda: (order.append("before"), time.sleep(0.05)))
    assert order == ["before", "call"] * (len(timing.calls) + 1)  # the warm-up call too
    assert len(timing.calls) == MIN_CALLS and timing.best < 0.01


def test_a_call_slower_than_the_allowance_is_timed_twice_and_says_nothing_of_the_spread():
    sleeps = iter([0.09, 0.03])
    timing = time_calls(lambda: time.sleep(next(sleeps)), 0.02)
    assert len(timing.calls) == 2 and 0.03 <= timing.best < 0.09
    watch = LoadWatch(load_avg=0.0, cores=4, timings=[timing, Timing((1.0, 1.1, 1.0))])
    assert watch.verdict().spread == 1.0 and not watch.verdict().busy


def test_the_verdict_weighs_the_spread_and_the_load():
    steady = [Timing((1.0, 1.1, 1.2)), Timing((2.0, 2.1, 2.0))]
    scattered = [Timing((1.0, 4.0, 9.0)), Timing((2.0, 6.0, 5.0)), Timing((1.0, 1.1, 1.0))]
    assert not LoadWatch(load_avg=1.5, cores=2, timings=steady).verdict().busy
    assert LoadWatch(load_avg=1.5, cores=2, timings=scattered).verdict().busy
    overloaded = LoadWatch(load_avg=BUSY_LOAD_PER_CORE * 2 + 0.5, cores=2, timings=steady).verdict()
    assert overloaded.busy and overloaded.load_avg == 2.5 and overloaded.cores == 2
    # The better of the two core shares counts: one low reading alone is not busy.
    assert not LoadWatch(load_avg=1.5, cores=2, cpu_shares=[0.3, 0.95], timings=steady).verdict().busy
    crowded = LoadWatch(load_avg=1.5, cores=2, cpu_shares=[0.3, 0.4], timings=steady).verdict()
    assert crowded.busy and crowded.cpu_share == 0.4


def test_a_real_cpu_load_leaves_the_probes_a_fraction_of_a_core_and_the_host_busy():
    """Three spinning child processes per core: the watch's own spinning thread gets about a
    third of a core (or less where the host was busy already), and its verdict is busy."""
    burners = [subprocess.Popen([sys.executable, "-c",
                                 f"import time\nend = time.time() + {BURN_S}\nwhile time.time() < end: pass"])
               for _ in range(3 * usable_cores())]
    try:
        time.sleep(0.5)  # the burners are spinning
        with watch_load() as watch:
            for _ in range(3):
                op_overhead_s("cpu", torch.float32)
        verdict = watch.verdict()
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()
    assert verdict.cpu_share < BUSY_CPU_SHARE, verdict
    assert verdict.busy and len(watch.timings) == 3


def test_the_real_profile_records_whether_the_host_was_busy(tmp_path):
    home, disk = tmp_path / "home", tmp_path / "disk"
    prof = load_or_measure_profile(disk, home=home, **FAST)
    load = prof.load_seen
    assert set(load) == {"load_avg", "cores", "spread", "cpu_share"}
    assert load["cores"] == usable_cores() and load["load_avg"] >= 0 and load["spread"] >= 1.0
    assert 0 < load["cpu_share"] <= 1.05
    assert prof.busy == (load["spread"] > BUSY_SPREAD or load["cpu_share"] < BUSY_CPU_SHARE
                         or load["load_avg"] > BUSY_LOAD_PER_CORE * load["cores"])
    stored = json.loads(profile_path(disk, home).read_text())
    assert stored["busy"] == prof.busy and stored["load_seen"] == load
