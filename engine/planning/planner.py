"""Policy search: FlexGen's linear program over the placement fractions, solved with pulp/CBC.

For each discrete choice (gpu_batch_size x num_gpu_batches x compression x CPU attention) the
nine placement fractions are continuous and every time and memory term of `engine.planning.cost_model` is
linear in them, so the best placement is an LP (FlexGen section 4.3): minimise the block's time
subject to per-tier peak memory <= budget, with the per-stage max(resources) linearised as one
auxiliary variable >= each resource's time. The outer loop enumerates the discrete choices and
keeps the best throughput (block rows * gen_len / block time). `tests.support.planner_grid` solves the
same problem by brute force over the same cost model, to check the LP in tests.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import numpy as np
import pulp

from engine.planning.cost_inputs import (GIB, Placement, Shape, WeightSplit, max_weights_disk_fraction, weight_shares)
from engine.planning.cost_model import Estimate, block_time, estimate
from engine.planning.cost_memory import memory_peaks, peak_bytes
from engine.planning.cost_time import phase_terms
from engine.errors import BudgetError
from engine.planning.hardware import HardwareProfile
from engine.planning.lp_solver import lp_variable, solved_to_optimum
from engine.model.config import OPTConfig
from engine.runtime.policy import Policy

DEFAULT_GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_NUM_GPU_BATCHES = (1, 2, 4, 8, 16, 32)
FRACTIONS = ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")
MEMORY_SLACK_BYTES = 2 ** 20  # a budget within this of its peak binds the LP


@dataclass(frozen=True, kw_only=True)
class Candidate:
    policy: Policy
    estimate: Estimate

    @property
    def tokens_per_s(self) -> float:
        return self.estimate.tokens_per_s

    def to_dict(self) -> dict:
        e = self.estimate
        return {"policy": self.policy.to_dict(), "describe": self.policy.describe(),
                "tokens_per_s": e.tokens_per_s, "block_s": e.total_s, "prefill_s": e.prefill_s,
                "decode_step_s": e.decode_step_s, "peak_gib": e.peak_gib, "bottleneck": e.bottleneck}


@dataclass(frozen=True, kw_only=True)
class Plan:
    policy: Policy
    tokens_per_s: float
    peak_gib: dict[str, float]
    estimate: Estimate
    budgets_gib: dict[str, float | None]
    alternatives: tuple[Candidate, ...] = ()
    lp_objective_s: float = 0.0   # the LP's block time for the chosen shape (before rounding)
    solved: int = 0               # LPs solved
    skipped: int = 0              # shapes pruned without an LP (bound, or no room)

    def to_dict(self) -> dict:
        return {"policy": self.policy.to_dict(), "describe": self.policy.describe(),
                "tokens_per_s": self.tokens_per_s, "peak_gib": self.peak_gib,
                "budgets_gib": self.budgets_gib, "bottleneck": self.estimate.bottleneck,
                "block_s": self.estimate.total_s, "prefill_s": self.estimate.prefill_s,
                "decode_step_s": self.estimate.decode_step_s,
                "alternatives": [c.to_dict() for c in self.alternatives],
                "lps_solved": self.solved, "shapes_pruned": self.skipped}


def budgets_bytes(hw: HardwareProfile, gpu_mem_gib: float | None, cpu_mem_gib: float | None,
                  disk_mem_gib: float | None) -> dict[str, float | None]:
    """GiB budgets per tier (None = no limit). Without a GPU there is no GPU tier: its share is RAM."""
    return {"gpu": gpu_mem_gib if hw.has_gpu else None,
            "cpu": cpu_mem_gib,
            "disk": disk_mem_gib if disk_mem_gib is not None else hw.disk_free_gib}


def shapes(hw: HardwareProfile, *, prompt_len: int, gen_len: int,
           gpu_batch_sizes=DEFAULT_GPU_BATCH_SIZES, num_gpu_batches=DEFAULT_NUM_GPU_BATCHES,
           compress_options=(False, True), max_block_size: int | None = None) -> list[Shape]:
    """The outer enumeration. CPU attention is a choice only when there is a GPU."""
    cpu_attn = (False, True) if hw.has_gpu else (False,)
    out = []
    for gbs, nb, comp, ca in itertools.product(gpu_batch_sizes, num_gpu_batches, compress_options, cpu_attn):
        if max_block_size is not None and gbs * nb > max_block_size:
            continue
        # FlexGen compresses weights and cache together; so do we (one switch, half the shapes).
        out.append(Shape(gpu_batch_size=gbs, num_gpu_batches=nb, prompt_len=prompt_len, gen_len=gen_len,
                         compress_weight=comp, compress_cache=comp, cpu_cache_compute=ca))
    return out


def _fixed_gpu_zero(hw: HardwareProfile) -> bool:
    # Without a GPU the "gpu" fractions would be RAM too; keep them 0 so a plan reads as CPU + disk.
    return not hw.has_gpu


def solve_lp(cfg: OPTConfig, hw: HardwareProfile, sh: Shape,
             budgets_gib: dict[str, float | None], *, minimise_tier: str | None = None
             ) -> tuple[float, Placement] | None:
    """Best placement for one shape: (block seconds, fractions), or None if nothing fits.
    With minimise_tier, minimise that tier's peak bytes instead (used to name the smallest budget).

    Placement puts the lookup tables on disk whenever any weights go there, a step the LP cannot
    express, so it solves with them on disk (reading their rows is free in the model, so this is
    never slower while the disk has room for them), and with all weights in memory when that fails
    or when nothing else would be streamed (then memory is preferred at equal predicted time).
    A cache slot with a part on disk costs its per-step requests and ops whatever the part's size
    (cost_time), a step the LP cannot express either: it solves with the cache in memory, and
    with a disk part paid for, and keeps the faster (memory at equal time). A disk part only ever
    adds time, and buys memory: where the cache in memory leaves every budget slack, it is the answer
    and the second solve is skipped."""
    best = None
    for cache_disk_part in (False, True):
        found = _solve_lookup_choices(cfg, hw, sh, budgets_gib, minimise_tier, cache_disk_part)
        if found is not None and (best is None or found[0] < best[0] * (1 - 1e-9)):
            best = found
        if minimise_tier is None and found is not None and not found[2]:
            break
    return best[:2] if best is not None else None


def _solve_lookup_choices(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, budgets_gib: dict[str, float | None],
                          minimise_tier: str | None, cache_disk_part: bool) -> tuple[float, Placement, bool] | None:
    found = _solve_lp(cfg, hw, sh, budgets_gib, minimise_tier, True, cache_disk_part)
    if found is not None and found[1].wd > weight_shares(cfg)[0] + 1e-9:
        return found
    in_memory = _solve_lp(cfg, hw, sh, budgets_gib, minimise_tier, False, cache_disk_part)
    if found is None or (in_memory is not None and in_memory[0] <= found[0] * (1 + 1e-9)):
        return in_memory
    return found


def _solve_lp(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, budgets_gib: dict[str, float | None],
              minimise_tier: str | None, lookup_on_disk: bool, cache_disk_part: bool
              ) -> tuple[float, Placement, bool] | None:
    """(block seconds, fractions, whether a memory budget binds at the optimum), or None."""
    prob = pulp.LpProblem("flexjob_placement", pulp.LpMinimize)
    v = {k: lp_variable(prob, k, 1) for k in FRACTIONS}
    if not cache_disk_part:
        prob += v["cd"] == 0, "cache_in_memory"
    for kind in "wch":
        prob += v[kind + "g"] + v[kind + "c"] + v[kind + "d"] == 1
        if _fixed_gpu_zero(hw):
            prob += v[kind + "g"] == 0
    # Where each kind of weight is follows from wg and wd (cost_model.weight_split): linear once
    # the lookup tables' tier is fixed. The head never goes to disk in a plan.
    lookup, layers = weight_shares(cfg)
    if lookup_on_disk:
        prob += v["wd"] >= lookup, "lookup_on_disk"
        prob += v["wd"] <= max_weights_disk_fraction(cfg), "head_in_memory"
    else:
        prob += v["wd"] == 0, "all_weights_in_memory"
    prob += v["wg"] <= 1 - lookup, "lookup_not_on_gpu"
    split = WeightSplit(layers_on_disk=(v["wd"] - lookup) * (1 / layers) if lookup_on_disk else 0.0 * v["wd"],
                        head_on_disk=0.0, lookup_held=0.0 if lookup_on_disk else 1.0,
                        matmul_on_gpu=v["wg"] * (1 / (1 - lookup)))
    x = Placement(**v, split=split, cache_disk_part=1.0 if cache_disk_part else 0.0)
    total = 0
    for phase, repeat in (("pre", 1), ("dec", sh.gen_len - 1)):
        for i, (count, terms) in enumerate(phase_terms(cfg, hw, sh, x, decode=phase == "dec")):
            if sh.overlap:  # linearised max: t >= every resource's busy time
                t = lp_variable(prob, f"t_{phase}_{i}")
                for name, term in terms.items():
                    prob += t >= term, f"max_{phase}_{i}_{name}"
            else:
                t = pulp.lpSum(terms.values())
            total = total + repeat * count * t
    peak_vars, memory_limits = {}, []
    for tier, cands in memory_peaks(cfg, hw, sh, x).items():
        limit = budgets_gib.get(tier)
        if tier == minimise_tier:
            peak_vars[tier] = lp_variable(prob, f"peak_{tier}")
            for j, c in enumerate(cands):
                prob += peak_vars[tier] >= c, f"peak_{tier}_{j}"
        elif limit is not None:
            for j, c in enumerate(cands):
                memory_limits.append(c <= limit * GIB)
                prob += memory_limits[-1], f"mem_{tier}_{j}"
    prob += peak_vars[minimise_tier] if minimise_tier else total
    if not solved_to_optimum(prob):
        return None
    fr = {k: min(1.0, max(0.0, float(v[k].value() or 0.0))) for k in FRACTIONS}
    value = pulp.value(prob.objective)
    binds = any(limit.value() > -MEMORY_SLACK_BYTES for limit in memory_limits)
    return float(value), Placement(**fr), binds


def to_policy(sh: Shape, x: Placement) -> Policy:
    """Percents from fractions, floored to 0.01 % for the GPU and CPU shares (the crumbs go to disk,
    so rounding never raises the GPU or CPU peak)."""
    def pct(f: float) -> float:
        return max(0.0, np.floor(float(f) * 1e4 + 1e-6) / 100.0)
    return Policy(gpu_batch_size=sh.gpu_batch_size, num_gpu_batches=sh.num_gpu_batches,
                  weights_gpu_percent=pct(x.wg), weights_cpu_percent=pct(x.wc),
                  cache_gpu_percent=pct(x.cg), cache_cpu_percent=pct(x.cc),
                  activations_gpu_percent=pct(x.hg), activations_cpu_percent=pct(x.hc),
                  overlap=sh.overlap, cpu_cache_compute=sh.cpu_cache_compute,
                  compress_weight=sh.compress_weight, compress_cache=sh.compress_cache,
                  compression=sh.compression)


def _lower_bound_s(cfg: OPTConfig, hw: HardwareProfile, sh: Shape) -> float:
    """Block time if everything sat on the compute device (ignoring memory): no placement beats it."""
    best = Placement(wg=1.0, wc=0.0, wd=0.0, cg=1.0, cc=0.0, cd=0.0, hg=1.0, hc=0.0, hd=0.0)
    if not hw.has_gpu:
        best = Placement(wg=0.0, wc=1.0, wd=0.0, cg=0.0, cc=1.0, cd=0.0, hg=0.0, hc=1.0, hd=0.0)
    return float(block_time(cfg, hw, sh, best))


def tensor_cpu_budget(cpu_mem_gib: float | None, cpu_reserved_gib: float) -> float | None:
    """The CPU budget (GiB) left to the engine's tensors once the process's own memory is off it
    (None: no budget): what `plan` plans under and `estimate` takes as `cpu_budget_gib`."""
    return None if cpu_mem_gib is None else max(0.0, cpu_mem_gib - cpu_reserved_gib)


def plan(config: OPTConfig, hardware: HardwareProfile, *, gpu_mem_gib: float | None,
         cpu_mem_gib: float | None, disk_mem_gib: float | None = None, prompt_len: int,
         gen_len: int, compress_options=(False, True), gpu_batch_sizes=DEFAULT_GPU_BATCH_SIZES,
         num_gpu_batches=DEFAULT_NUM_GPU_BATCHES, max_block_size: int | None = None,
         num_alternatives: int = 5, cpu_reserved_gib: float = 0.0) -> Plan:
    """The best policy under the cost model for these budgets (GiB), or BudgetError.
    cpu_reserved_gib: RAM the process already holds outside the engine's tensors (Python, torch,
    tokenizer); the engine counts its whole RSS against the CPU budget, so the caller passes it here.
    The peaks a plan reports include it: what the engine's check compares with the budgets as given."""
    given = budgets_bytes(hardware, gpu_mem_gib, cpu_mem_gib, disk_mem_gib)
    budgets = budgets_bytes(hardware, gpu_mem_gib, tensor_cpu_budget(cpu_mem_gib, cpu_reserved_gib), disk_mem_gib)
    cands: list[tuple[float, Candidate, float]] = []
    best_tps, solved, skipped = 0.0, 0, 0
    all_shapes = shapes(hardware, prompt_len=prompt_len, gen_len=gen_len, gpu_batch_sizes=gpu_batch_sizes,
                        num_gpu_batches=num_gpu_batches, compress_options=compress_options,
                        max_block_size=max_block_size)
    # Big blocks first: they usually win, which makes the bound below prune more.
    for sh in sorted(all_shapes, key=lambda s: -s.block_size):
        bound_tps = sh.block_size * gen_len / _lower_bound_s(config, hardware, sh)
        if bound_tps <= best_tps:
            skipped += 1
            continue
        solved += 1
        found = _solve_fitting(config, hardware, sh, budgets, prompt_len=prompt_len, gen_len=gen_len)
        if found is None:
            continue
        lp_s, pol, est = found
        cands.append((est.tokens_per_s, Candidate(policy=pol, estimate=est), lp_s))
        best_tps = max(best_tps, est.tokens_per_s)
    if not cands:
        raise _impossible(config, hardware, budgets, prompt_len, gen_len, compress_options, cpu_reserved_gib)
    cands.sort(key=lambda c: -c[0])
    best_tps, best, lp_s = cands[0]
    # Alternatives: the best of each other block shape (cpu attention on/off alone is not news).
    seen, alts = {_shape_key(best.policy)}, []
    for _, cand, _ in cands[1:]:
        if _shape_key(cand.policy) not in seen and len(alts) < num_alternatives:
            seen.add(_shape_key(cand.policy))
            alts.append(Candidate(policy=cand.policy, estimate=_with_process(cand.estimate, cpu_reserved_gib)))
    chosen = _with_process(best.estimate, cpu_reserved_gib)
    return Plan(policy=best.policy, tokens_per_s=best.tokens_per_s, peak_gib=chosen.peak_gib,
                estimate=chosen, budgets_gib=given, alternatives=tuple(alts),
                lp_objective_s=lp_s, solved=solved, skipped=skipped)


def _with_process(est: Estimate, cpu_reserved_gib: float) -> Estimate:
    """The estimate with the process's own memory in its CPU peak, as the engine counts it."""
    return dataclasses.replace(est, peak_gib={**est.peak_gib, "cpu": est.peak_gib["cpu"] + cpu_reserved_gib})


def _solve_fitting(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, budgets: dict[str, float | None], *,
                   prompt_len: int, gen_len: int) -> tuple[float, Policy, Estimate] | None:
    """The LP's policy for one shape whose peaks as the engine's budget check counts them fit (the
    LP's linear model approximates them): while a tier's peak is over, solve again with that tier's
    budget lowered by the excess; then win back, by bisection, what the lowering overshot."""
    limits, over = dict(budgets), None
    for attempt in range(8):
        found = _lp_policy(cfg, hw, sh, limits, budgets, prompt_len, gen_len)
        if found is None:
            # Lowered past what any placement fits: a fitting one may lie between the two limits
            # (peaks move in whole slots, so a bigger budget can miss where a smaller one fits).
            return _between(cfg, hw, sh, over, limits, budgets, prompt_len, gen_len) if over else None
        if found[2].fits(budgets):
            break
        over, limits = dict(limits), dict(limits)
        for tier, limit in budgets.items():
            if limit is not None and found[2].peak_gib[tier] > limit:
                # Exact peaks move in whole tensors and cache slots, so a lowering by the excess
                # alone can creep towards the budget without reaching it: each retry lowers twice
                # as far, and the bisection below wins back what that overshoots.
                limits[tier] -= (found[2].peak_gib[tier] - limit) * 1.01 * 2 ** attempt
                if limits[tier] <= 0:
                    return None
    else:
        return None
    for _ in range(3 if over is not None else 0):
        mid = {t: None if lim is None else (lim + over[t]) / 2 for t, lim in limits.items()}
        trial = _lp_policy(cfg, hw, sh, mid, budgets, prompt_len, gen_len)
        if trial is not None and trial[2].fits(budgets):
            limits, found = mid, max(found, trial, key=lambda f: f[2].tokens_per_s)
        else:
            over = mid
    return found


def _between(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, over: dict, infeasible: dict,
             budgets: dict[str, float | None], prompt_len: int, gen_len: int,
             rounds: int = 6) -> tuple[float, Policy, Estimate] | None:
    """Bisect the LP's limits between `over` (its placement exceeds the budgets) and `infeasible`
    (no placement) for one that fits the budgets."""
    for _ in range(rounds):
        mid = {t: None if lim is None else (lim + infeasible[t]) / 2 for t, lim in over.items()}
        trial = _lp_policy(cfg, hw, sh, mid, budgets, prompt_len, gen_len)
        if trial is None:
            infeasible = mid
        elif trial[2].fits(budgets):
            return trial
        else:
            over = mid
    return None


def _lp_policy(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, limits: dict[str, float | None],
               budgets: dict[str, float | None], prompt_len: int,
               gen_len: int) -> tuple[float, Policy, Estimate] | None:
    """The LP's placement under `limits` as a policy in rounded percents, or in exact ones when
    rounding alone makes it miss the budgets (rounding only moves crumbs to disk)."""
    res = solve_lp(cfg, hw, sh, limits)
    if res is None:
        return None
    lp_s, x = res
    pol = to_policy(sh, x)
    est = estimate(cfg, hw, pol, prompt_len=prompt_len, gen_len=gen_len, cpu_budget_gib=budgets.get("cpu"))
    if not est.fits(budgets):
        pol = _exact_policy(sh, x)
        est = estimate(cfg, hw, pol, prompt_len=prompt_len, gen_len=gen_len, cpu_budget_gib=budgets.get("cpu"))
    return lp_s, pol, est


def _shape_key(p: Policy) -> tuple:
    return p.gpu_batch_size, p.num_gpu_batches, p.compress_weight


def _exact_policy(sh: Shape, x: Placement) -> Policy:
    p = to_policy(sh, x)
    exact = {}
    for kind, short in (("weights", "w"), ("cache", "c"), ("activations", "h")):
        gpu = min(100.0, max(0.0, float(getattr(x, short + "g")) * 100))
        exact[f"{kind}_gpu_percent"] = gpu
        exact[f"{kind}_cpu_percent"] = min(100.0 - gpu, max(0.0, float(getattr(x, short + "c")) * 100))
    return p.replace(**exact)


def smallest_budgets(config: OPTConfig, hardware: HardwareProfile, budgets: dict[str, float | None],
                     prompt_len: int, gen_len: int, compress_options=(False, True)) -> dict[str, float]:
    """For each tier, the smallest budget (GiB) that works with the other budgets as given,
    at the smallest block (1 x 1) where memory is lowest. A tier that cannot rescue the plan on its
    own is left out."""
    out = {}
    for tier in ("gpu", "cpu", "disk"):
        if tier == "gpu" and not hardware.has_gpu:
            continue
        others = {t: lim for t, lim in budgets.items() if t != tier}
        best = None
        for sh in shapes(hardware, prompt_len=prompt_len, gen_len=gen_len, gpu_batch_sizes=(1,),
                         num_gpu_batches=(1,), compress_options=compress_options):
            res = solve_lp(config, hardware, sh, others, minimise_tier=tier)
            if res is None:
                continue
            exact = float(peak_bytes(config, hardware, sh, res[1], exact=True)[tier])
            need = max(res[0], exact) / GIB  # the LP's relaxed staging, or the exact whole-slot figure
            # The LP's optimum sits on every binding budget; its policy in rounded percents may
            # not: a suggestion (as printed, to 0.01 GiB) must be one the planner then accepts.
            need = math.ceil(need * 100) / 100
            for _ in range(20):
                if _solve_fitting(config, hardware, sh, {**budgets, tier: need}, prompt_len=prompt_len,
                                  gen_len=gen_len) is not None:
                    best = need if best is None else min(best, need)
                    break
                need = math.ceil(need * 100.5) / 100
        if best is not None and (budgets.get(tier) is None or best > budgets[tier]):
            out[tier] = best  # a tier already given that much is not the fix
    return out


def _impossible(config: OPTConfig, hardware: HardwareProfile, budgets: dict, prompt_len: int,
                gen_len: int, compress_options, cpu_reserved_gib: float = 0.0) -> BudgetError:
    need = smallest_budgets(config, hardware, budgets, prompt_len, gen_len, compress_options)
    # Budgets as the user gave them: the process's own memory was taken off the CPU budget before.
    shown = {t: (v + cpu_reserved_gib if t == "cpu" and v is not None else v) for t, v in budgets.items()}
    given = ", ".join(f"{t} {v:.3g} GiB" for t, v in shown.items() if v is not None)
    if "cpu" in need:
        need["cpu"] += cpu_reserved_gib
    subject = f"{config.name} (prompt {prompt_len}, gen {gen_len}) does not fit in {given} with any policy"
    if need:
        return BudgetError(subject, smallest_gib={t: float(np.ceil(v * 100) / 100) for t, v in need.items()})
    total = config.param_count() * 2 / GIB
    return BudgetError(subject, otherwise=(", and raising a single budget is not enough: the fp16 weights "
                                           f"alone are {total:.1f} GiB"))
