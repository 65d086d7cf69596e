"""Run a benchmark child under a hard memory limit that counts the page cache too (a Linux memory
cgroup, v2 or v1; needs root), so a baseline's "disk offload" really reads from disk.

`max_memory` of transformers + accelerate places weights but does not limit the process, and the
offload folder it has just written sits in the page cache: without a limit, an offloaded run reads
its weights from RAM. Inside a cgroup of N GiB, the process's memory and the file pages it reads
share N GiB, as they would on a machine that has N GiB: past that, it reads from disk or is killed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

V2_ROOT = Path("/sys/fs/cgroup")
V2_UNIFIED = Path("/sys/fs/cgroup/unified")  # the v2 hierarchy beside v1 controllers (hybrid hosts)
V1_MEMORY = Path("/sys/fs/cgroup/memory")


def _v1_usable() -> bool:
    return (V1_MEMORY / "memory.limit_in_bytes").is_file() and os.access(V1_MEMORY, os.W_OK)


def _v2_root() -> Path | None:
    for root in (V2_ROOT, V2_UNIFIED):
        controllers = root / "cgroup.controllers"
        if controllers.is_file() and "memory" in controllers.read_text().split() and os.access(root, os.W_OK):
            return root
    return None


def available() -> str | None:
    """Why a limited run is impossible here, or None when it is possible."""
    if os.geteuid() != 0:
        return "memory limits need root (a memory cgroup)"
    if _v1_usable() or _v2_root() is not None:
        return None
    return "no writable memory cgroup controller (v1 or v2) on this host"


@contextmanager
def memory_limit(gib: float, name: str) -> Iterator[tuple[Callable[[], None], Callable[[], dict]]]:
    """A fresh cgroup limited to `gib` GiB: yields (preexec_fn that moves the child into it, a
    function that reads its peak usage and OOM kills so far); removed on exit."""
    limit = int(gib * 2**30)
    if _v1_usable():
        group = V1_MEMORY / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.is_file():
            swap.write_text(str(limit))  # no escape into swap

        def stats() -> dict:
            failed = int((group / "memory.failcnt").read_text())
            oom = (group / "memory.oom_control").read_text()
            kills = next((int(line.split()[1]) for line in oom.splitlines() if line.startswith("oom_kill ")), 0)
            return {"cgroup_peak_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
                    "cgroup_oom_kills": kills, "cgroup_limit_hits": failed}
    else:
        root = _v2_root()
        if root is None:
            raise RuntimeError(available() or "no memory cgroup")
        subtree = root / "cgroup.subtree_control"
        if "memory" not in subtree.read_text().split():
            subtree.write_text("+memory")
        group = root / name
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit))
        if (group / "memory.swap.max").is_file():
            (group / "memory.swap.max").write_text("0")

        def stats() -> dict:
            events = dict(line.split() for line in (group / "memory.events").read_text().splitlines())
            peak = group / "memory.peak"
            return {"cgroup_peak_bytes": int(peak.read_text()) if peak.is_file() else None,
                    "cgroup_oom_kills": int(events.get("oom_kill", 0)), "cgroup_limit_hits": int(events.get("max", 0))}

    def enter() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    try:
        yield enter, stats
    finally:
        try:
            group.rmdir()
        except OSError:
            pass
