"""A user-space RSS cap: run a child, sample its memory, kill it the moment it passes the cap.

Not an example itself. RLIMIT_AS is no RSS cap (torch and safetensors map far more address space
than they touch) and a cgroup needs privileges the examples should not ask for, so the cap here is
on what a memory cgroup could not reclaim: the child's anonymous memory (`RssAnon` in
/proc/PID/status). File-backed pages (a mapped checkpoint) are left out, since under a real limit
the kernel would drop them instead of killing the process; they show in the reported VmRSS peak.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

GIB = 1024 ** 3


def _status_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of pid, in KiB (empty once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon") if k in fields}


def run_capped(cmd: list[str], cap_gib: float, *, poll_s: float = 0.02, timeout_s: float = 1800) -> dict:
    """Run cmd; SIGKILL it when its anonymous RSS passes cap_gib. Returns what happened, peaks in GiB."""
    with tempfile.TemporaryFile("w+") as log:   # a file, not a pipe: a chatty child never blocks
        result = _watch(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), cap_gib,
                        poll_s=poll_s, timeout_s=timeout_s)
        log.seek(0)
        return {**result, "output_tail": log.read()[-600:]}


def _watch(proc: subprocess.Popen, cap_gib: float, *, poll_s: float, timeout_s: float) -> dict:
    start = time.perf_counter()
    peak_anon = peak_rss = 0
    killed = None
    while proc.poll() is None:
        kib = _status_kib(proc.pid)
        peak_anon, peak_rss = max(peak_anon, kib.get("RssAnon", 0)), max(peak_rss, kib.get("VmRSS", 0))
        elapsed = time.perf_counter() - start
        if peak_anon * 1024 > cap_gib * GIB or elapsed > timeout_s:
            killed = "cap" if elapsed <= timeout_s else "timeout"
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(poll_s)
    proc.wait()
    return {"returncode": proc.returncode, "killed": killed,
            "wall_s": round(time.perf_counter() - start, 2),
            "peak_rss_anon_gib": round(peak_anon / 1024 ** 2, 3), "peak_vmrss_gib": round(peak_rss / 1024 ** 2, 3)}
