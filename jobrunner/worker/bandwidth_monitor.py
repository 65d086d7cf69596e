"""Re-planning while a job runs: watch the bandwidth the engine gets, re-solve the LP when it drifts.

The engine reports per block a plain dict {link: (bytes, seconds)} with the link names of
`engine.planning.hardware` (disk_read, disk_write, cpu_to_gpu, gpu_to_cpu). The monitor keeps an EWMA
per link and counts a block as drifted when both that block's bandwidth and the EWMA differ from
the reference (the profile at first) by more than `threshold` in the same direction; requiring
both means a single noisy block cannot start a streak, and a one-off spike that the EWMA still
remembers cannot extend one. After `consecutive` drifted blocks the LP is re-solved with the
measured bandwidth of the streak (its bytes over its seconds, not the EWMA, which lags); the new
plan is proposed only if predicted better than the current policy, under the same measured
hardware, by `margin`. Either way the measured values become the new reference, so a steady new
bandwidth costs one LP solve, not one per block, and a recovery is seen as a drift again.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.planning.cost_model import estimate
from engine.errors import BudgetError
from engine.planning.hardware import HardwareProfile
from engine.runtime.tiers import LINKS
from engine.model.config import OPTConfig
from engine.planning.planner import plan, tensor_cpu_budget
from engine.runtime.policy import Policy

DEFAULT_THRESHOLD = 0.30
DEFAULT_CONSECUTIVE = 2
DEFAULT_MARGIN = 0.10
DEFAULT_ALPHA = 0.5
MIN_BYTES = 1 << 20  # a link that moved less than this in a block says nothing about its bandwidth


@dataclass(frozen=True, kw_only=True)
class ReplanDecision:
    block_index: int
    old_policy: Policy
    new_policy: Policy
    profiled_gbps: dict[str, float]   # the profile the run started with
    measured_gbps: dict[str, float]   # the drifted links, over their streak
    drifted_links: tuple[str, ...]
    old_tokens_per_s: float           # the current policy under the measured hardware
    new_tokens_per_s: float           # the re-solved plan under the measured hardware
    apply: bool                       # predicted gain >= margin

    @property
    def predicted_gain(self) -> float:
        return self.new_tokens_per_s / self.old_tokens_per_s - 1.0 if self.old_tokens_per_s > 0 else float("inf")

    def to_event(self) -> dict:
        """The payload of the job's `replan` event."""
        return {"block_index": self.block_index, "applied": self.apply,
                "old_policy": self.old_policy.to_dict(), "new_policy": self.new_policy.to_dict(),
                "old_describe": self.old_policy.describe(), "new_describe": self.new_policy.describe(),
                "profiled_gbps": self.profiled_gbps, "measured_gbps": self.measured_gbps,
                "drifted_links": list(self.drifted_links), "old_tokens_per_s": self.old_tokens_per_s,
                "new_tokens_per_s": self.new_tokens_per_s, "predicted_gain": self.predicted_gain}


@dataclass
class _LinkState:
    ewma: float | None = None
    streak: int = 0
    direction: int = 0
    streak_bytes: float = 0.0
    streak_seconds: float = 0.0


@dataclass
class BandwidthMonitor:
    config: OPTConfig
    hardware: HardwareProfile
    policy: Policy
    gpu_mem_gib: float | None
    cpu_mem_gib: float | None
    prompt_len: int
    gen_len: int
    disk_mem_gib: float | None = None
    threshold: float = DEFAULT_THRESHOLD
    consecutive: int = DEFAULT_CONSECUTIVE
    margin: float = DEFAULT_MARGIN
    alpha: float = DEFAULT_ALPHA
    min_bytes: float = MIN_BYTES
    plan_kwargs: dict = field(default_factory=dict)  # e.g. a smaller enumeration, compress_options

    def __post_init__(self) -> None:
        self.reference = self.hardware
        self.blocks = 0
        self.links = {link: _LinkState() for link in LINKS}
        self.last_check: ReplanDecision | None = None  # the last re-solve, applied or not

    def observe(self, block_stats: Mapping[str, tuple[float, float]]) -> ReplanDecision | None:
        """Feed one finished block's {link: (bytes, seconds)}. Returns a decision to apply at the next
        block boundary, or None. After a decision the monitor assumes it was applied."""
        self.blocks += 1
        for link, (nbytes, seconds) in block_stats.items():
            state = self.links.get(link)
            ref = self.reference.link_gbps(link) if state is not None else 0.0
            if state is None or nbytes < self.min_bytes or seconds <= 0 or ref <= 0:
                continue  # unknown link, too little traffic to judge, or a link this host lacks
            raw = nbytes / seconds / 1e9
            state.ewma = raw if state.ewma is None else self.alpha * raw + (1 - self.alpha) * state.ewma
            direction = _drift(raw, ref, self.threshold)
            if direction and direction == _drift(state.ewma, ref, self.threshold):
                if direction != state.direction:
                    state.streak, state.streak_bytes, state.streak_seconds = 0, 0.0, 0.0
                state.streak += 1
                state.direction = direction
                state.streak_bytes += nbytes
                state.streak_seconds += seconds
            else:
                state.streak, state.direction, state.streak_bytes, state.streak_seconds = 0, 0, 0.0, 0.0
        drifted = tuple(k for k, s in self.links.items() if s.streak >= self.consecutive)
        if not drifted:
            return None
        return self._replan(drifted)

    def _replan(self, drifted: tuple[str, ...]) -> ReplanDecision | None:
        measured = {k: self.links[k].streak_bytes / self.links[k].streak_seconds / 1e9 for k in drifted}
        new_hw = self.reference.with_links(measured)
        for k in drifted:  # the measured value is the new reference; start counting afresh
            self.links[k] = _LinkState(ewma=measured[k])
        self.reference = new_hw
        budgets = dict(gpu_mem_gib=self.gpu_mem_gib, cpu_mem_gib=self.cpu_mem_gib,
                       disk_mem_gib=self.disk_mem_gib)
        cpu_budget = tensor_cpu_budget(self.cpu_mem_gib, self.plan_kwargs.get("cpu_reserved_gib", 0.0))
        old = estimate(self.config, new_hw, self.policy, prompt_len=self.prompt_len, gen_len=self.gen_len,
                       cpu_budget_gib=cpu_budget)
        try:
            new = plan(self.config, new_hw, prompt_len=self.prompt_len, gen_len=self.gen_len,
                       **budgets, **self.plan_kwargs)
        except BudgetError:
            return None  # cannot happen while the current policy fits; keep running it if it does
        apply = new.tokens_per_s >= old.tokens_per_s * (1 + self.margin) and new.policy != self.policy
        decision = ReplanDecision(
            block_index=self.blocks - 1, old_policy=self.policy, new_policy=new.policy,
            profiled_gbps={k: self.hardware.link_gbps(k) for k in drifted}, measured_gbps=measured,
            drifted_links=drifted, old_tokens_per_s=old.tokens_per_s, new_tokens_per_s=new.tokens_per_s,
            apply=apply)
        self.last_check = decision
        if not apply:
            return None
        self.policy = new.policy
        return decision


def _drift(value: float, ref: float, threshold: float) -> int:
    """+1 if value is more than threshold above ref, -1 if below, else 0."""
    ratio = value / ref
    if ratio > 1 + threshold:
        return 1
    if ratio < 1 - threshold:
        return -1
    return 0
