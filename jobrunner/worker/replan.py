"""The worker's policy: planned from this host's stored hardware profile, re-planned while it runs.

Without `--percent`, the worker asks the LP planner for a policy as soon as it knows the model
(at its first shard), using the profile `flexjob profile` stored for this host and disk
directory. While it runs, `ProfileReplanner` feeds each finished block's transfer figures to the
`BandwidthMonitor`; when the monitor decides on a better policy, the worker applies it at the next
block boundary (`Worker._maybe_replan`) and records a `replan` event with the old and new policy
and the profiled and measured bandwidths.
"""
from __future__ import annotations

from pathlib import Path

from engine.planning.hardware import HardwareProfile
from engine.model.config import OPTConfig
from jobrunner.worker.bandwidth_monitor import BandwidthMonitor, ReplanDecision

# The planner sizes blocks for a prompt length; the worker plans before it has read a prompt, so
# it assumes a typical one (the monitor re-plans with measured bandwidth later either way).
PLAN_PROMPT_LEN = 256


def stored_profile_path(offload_dir: Path) -> str | None:
    """Where the profile of this host and disk directory is stored, if `flexjob profile` made one."""
    from engine.planning.profile_store import profile_path

    path = profile_path(offload_dir)
    return str(path.resolve()) if path.is_file() else None


def stored_profile(offload_dir: Path) -> HardwareProfile | None:
    """The profile `flexjob profile` measured for this host and disk directory, if there is one
    (never measured here: a worker should not spend minutes probing the disk unasked)."""
    path = stored_profile_path(offload_dir)
    if path is None:
        return None
    try:
        return HardwareProfile.load(Path(path))
    except (ValueError, OSError):
        return None

PROCESS_GROWTH_GIB = 0.03


# What a fresh `flexjob work` or `generate` process holds before it opens a model (Python, torch,
# transformers, the CLI and the planner imported): 0.295 GiB measured on a CPU-only Linux host with
# torch 2.13. `flexjob plan` plans for such a process, not for itself (it may run elsewhere, or
# inside a larger program).
WORKER_BASELINE_GIB = 0.30


def worker_reserved_gib() -> float:
    """What a worker process takes off the CPU budget before its tensors, for a plan made elsewhere."""
    return WORKER_BASELINE_GIB + PROCESS_GROWTH_GIB


def process_reserved_gib() -> float:
    """This process's own memory (its RSS, plus PROCESS_GROWTH_GIB), which the engine counts against
    --cpu-mem like its tensors: what every plan for a run here takes off the CPU budget."""
    import psutil

    return psutil.Process().memory_info().rss / 2**30 + PROCESS_GROWTH_GIB


def plan_for_this_process(config: OPTConfig, hardware: HardwareProfile, *, gpu_mem_gib: float | None,
                          cpu_mem_gib: float | None, gen_len: int, prompt_len: int = PLAN_PROMPT_LEN,
                          max_block_size: int | None = None, allow_compression: bool = False):
    """The LP plan for a run in this process (shared by `work` and `generate`).

    Compression changes the output, so the planner turns it on only when the user asked for it;
    the process's own memory counts against --cpu-mem like the engine's tensors, with room for
    what opening the model adds to it before the engine checks its budget (5 MB for opt-125m)."""
    from engine.planning.planner import plan

    reserved_gib = process_reserved_gib()
    return plan(config, hardware, gpu_mem_gib=gpu_mem_gib, cpu_mem_gib=cpu_mem_gib, prompt_len=prompt_len,
                gen_len=gen_len, compress_options=(True,) if allow_compression else (False,),
                max_block_size=max_block_size, cpu_reserved_gib=reserved_gib)


class ProfileReplanner:
    """The worker's `replanner` hook around a BandwidthMonitor (one per engine it sees)."""

    def __init__(self, hardware: HardwareProfile, *, gpu_mem_gib: float | None, cpu_mem_gib: float | None,
                 gen_len: int = 32, plan_kwargs: dict | None = None) -> None:
        self.hardware, self.gpu_mem_gib, self.cpu_mem_gib, self.gen_len = hardware, gpu_mem_gib, cpu_mem_gib, gen_len
        self.plan_kwargs = plan_kwargs or {}  # e.g. a smaller search space for the LP
        self._engine = None
        self._monitor: BandwidthMonitor | None = None
        self._seen_blocks = 0

    def __call__(self, engine) -> ReplanDecision | None:
        if engine is not self._engine:
            self._engine, self._seen_blocks = engine, len(engine.stats.blocks)
            self._monitor = BandwidthMonitor(config=engine.config, hardware=self.hardware, policy=engine.policy,
                                             gpu_mem_gib=self.gpu_mem_gib, cpu_mem_gib=self.cpu_mem_gib,
                                             prompt_len=PLAN_PROMPT_LEN, gen_len=self.gen_len,
                                             plan_kwargs=self.plan_kwargs)
            return None
        decision = None
        for block in engine.stats.blocks[self._seen_blocks:]:
            decision = self._monitor.observe(block.transfers) or decision
        self._seen_blocks = len(engine.stats.blocks)
        return decision
