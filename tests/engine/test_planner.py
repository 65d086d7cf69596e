"""The LP against brute force over the same cost model, budgets, impossible budgets, the T4 check."""
from __future__ import annotations

import json
import math
import random

import pytest

from engine.planning.cost_inputs import Shape
from engine.planning.cost_model import estimate
from engine.errors import BudgetError
from engine.planning.hardware import HardwareProfile, t4_flexgen
from engine.model.config import preset
from engine.planning.planner import _solve_lookup_choices, budgets_bytes, plan, solve_lp
from tests.support.planner_grid import grid_plan, grid_search
from engine.runtime.policy import Policy

SMALL = dict(gpu_batch_sizes=(1, 4, 16), num_gpu_batches=(1, 4))
SIZES = ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b", "175b")


def _random_hardware(rng: random.Random) -> HardwareProfile:
    def logu(lo, hi):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    common = dict(disk_read_gbps=logu(0.2, 6), disk_write_gbps=logu(0.2, 4), cpu_mem_gbps=logu(5, 100),
                  cpu_attention_gbps=logu(1, 50), dequant_gbps=logu(1, 200), op_overhead_s=logu(1e-6, 5e-5),
                  cpu_mem_gib=512, disk_free_gib=4000)
    if rng.random() < 0.6:
        return HardwareProfile(gpu_name="test-gpu", compute_dtype="float16", cpu_to_gpu_gbps=logu(4, 60),
                               gpu_to_cpu_gbps=logu(2, 60), gpu_mem_gbps=logu(200, 3000),
                               matmul_flops={"cuda": {"float16": logu(1e13, 5e14)}}, gpu_mem_gib=80, **common)
    return HardwareProfile(matmul_flops={"cpu": {"bfloat16": logu(5e10, 2e12)}}, **common)


def _random_case(rng: random.Random):
    cfg = preset(rng.choice(SIZES))
    hw = _random_hardware(rng)
    model_gib = 2 * cfg.param_count() / 2 ** 30
    budgets = dict(gpu_mem_gib=model_gib * rng.uniform(0.02, 0.6) + 0.5 if hw.has_gpu else None,
                   cpu_mem_gib=model_gib * rng.uniform(0.1, 1.2) + 0.5,
                   disk_mem_gib=model_gib * rng.uniform(0.5, 3.0))
    sh = Shape(gpu_batch_size=rng.choice((1, 2, 8, 32)), num_gpu_batches=rng.choice((1, 2, 4, 8)),
               prompt_len=rng.choice((32, 128, 512)), gen_len=rng.choice((8, 32)),
               compress_weight=(c := rng.random() < 0.4), compress_cache=c,
               cpu_cache_compute=hw.has_gpu and rng.random() < 0.5, overlap=rng.random() < 0.8)
    return cfg, hw, budgets, sh


def test_skipping_the_disk_part_solve_where_memory_is_slack_loses_nothing():
    """solve_lp skips the solve with a cache part on disk when the cache in memory leaves every budget
    slack: on random cases its answer is the better of both solves, each made in full."""
    rng = random.Random(20261204)
    skipped = 0
    for _ in range(30):
        cfg, hw, budgets, sh = _random_case(rng)
        limits = budgets_bytes(hw, budgets["gpu_mem_gib"], budgets["cpu_mem_gib"], budgets["disk_mem_gib"])
        in_memory, disk_part = (_solve_lookup_choices(cfg, hw, sh, limits, None, part) for part in (False, True))
        both = [found for found in (in_memory, disk_part) if found is not None]
        lp = solve_lp(cfg, hw, sh, limits)
        if not both:
            assert lp is None
            continue
        best = min(found[0] for found in both)
        assert lp is not None and lp[0] == pytest.approx(best, rel=1e-6), (cfg.name, sh, limits)
        skipped += in_memory is not None and not in_memory[2]
    assert skipped >= 3, f"too few cases with slack memory to test the skip: {skipped}"


def test_lp_matches_grid_search_on_random_cases():
    """>= 20 feasible random (model, budgets, hardware, shape) cases: LP objective within 1 % of the
    brute-force grid over the same cost model, never worse than it, and within budget."""
    rng = random.Random(20261126)
    agree, infeasible, worst = 0, 0, 0.0
    for _ in range(60):
        cfg, hw, budgets, sh = _random_case(rng)
        limits = budgets_bytes(hw, budgets["gpu_mem_gib"], budgets["cpu_mem_gib"], budgets["disk_mem_gib"])
        lp = solve_lp(cfg, hw, sh, limits)
        grid = grid_search(cfg, hw, sh, limits)
        if lp is None:
            assert grid is None, f"grid found a placement the LP calls infeasible: {cfg.name} {sh}"
            infeasible += 1
            continue
        assert grid is not None, f"LP found a placement the grid did not: {cfg.name} {sh}"
        lp_s, grid_s = lp[0], grid[0]
        assert lp_s <= grid_s * (1 + 1e-6), f"LP worse than grid: {cfg.name} {sh} {lp_s} > {grid_s}"
        worst = max(worst, grid_s / lp_s - 1)
        assert grid_s <= lp_s * 1.01, f"{cfg.name} {sh}: grid {grid_s} vs LP {lp_s}"
        agree += 1
        if agree >= 24:
            break
    assert agree >= 20, (agree, infeasible)
    print(f"LP vs grid: {agree} cases agree, worst gap {worst:.2e}, {infeasible} infeasible")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_whole_plan_matches_grid_over_the_same_enumeration(seed):
    rng = random.Random(seed)
    cfg, hw, budgets, sh = _random_case(rng)
    kw = dict(prompt_len=sh.prompt_len, gen_len=sh.gen_len, gpu_batch_sizes=(1, 8), num_gpu_batches=(1, 4),
              compress_options=(False, True))
    try:
        result = plan(cfg, hw, **budgets, **kw)
    except BudgetError:
        assert grid_plan(cfg, hw, **budgets, **kw) is None
        return
    best_grid = grid_plan(cfg, hw, **budgets, **kw)
    assert best_grid is not None
    assert result.tokens_per_s >= best_grid[0] * 0.99  # the LP is never worse than the grid's zoom
    assert result.estimate.fits(result.budgets_gib)


def test_every_returned_policy_fits_its_budgets():
    rng = random.Random(7)
    checked = 0
    for _ in range(12):
        cfg, hw, budgets, sh = _random_case(rng)
        try:
            result = plan(cfg, hw, **budgets, prompt_len=sh.prompt_len, gen_len=sh.gen_len, **SMALL)
        except BudgetError:
            continue
        for cand in (result, *result.alternatives):
            est = estimate(cfg, hw, cand.policy, prompt_len=sh.prompt_len, gen_len=sh.gen_len)
            assert est.fits(result.budgets_gib), (cand.policy.describe(), est.peak_gib, result.budgets_gib)
        checked += 1
    assert checked >= 6


def test_impossible_budget_names_the_smallest_budget_that_works():
    cfg, hw = preset("30b"), t4_flexgen()
    with pytest.raises(BudgetError) as err:
        plan(cfg, hw, gpu_mem_gib=1, cpu_mem_gib=2, disk_mem_gib=10, prompt_len=512, gen_len=32, **SMALL)
    msg, smallest = str(err.value), err.value.smallest_gib
    assert "does not fit" in msg and "smallest budget that works" in msg and f"gpu_mem_gib {smallest['gpu']:.2f}" in msg
    given = {"gpu": 1, "cpu": 2, "disk": 10}
    for tier, need in smallest.items():  # a budget already given that much is never the suggested fix
        assert need > given[tier], msg
    need = smallest["gpu"]
    ok = plan(cfg, hw, gpu_mem_gib=need, cpu_mem_gib=2, disk_mem_gib=10, prompt_len=512, gen_len=32, **SMALL)
    assert ok.peak_gib["gpu"] <= need + 1e-6
    with pytest.raises(BudgetError):
        plan(cfg, hw, gpu_mem_gib=need * 0.95, cpu_mem_gib=2, disk_mem_gib=10, prompt_len=512, gen_len=32, **SMALL)


def test_cpu_only_plan_uses_ram_and_disk_and_ignores_the_gpu_budget():
    hw = HardwareProfile(disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18,
                         matmul_flops={"cpu": {"bfloat16": 4e11}}, cpu_attention_gbps=10, cpu_mem_gib=23)
    result = plan(preset("1.3b"), hw, gpu_mem_gib=0.1, cpu_mem_gib=2, prompt_len=128, gen_len=16, **SMALL)
    p = result.policy
    assert p.weights_gpu_percent == p.cache_gpu_percent == p.activations_gpu_percent == 0
    assert p.disk_percent("weights") > 0 or p.compress_weight  # 2.4 GiB of fp16 weights in 2 GiB
    assert result.budgets_gib["gpu"] is None and result.peak_gib["cpu"] <= 2
    json.dumps(result.to_dict())


def test_t4_opt175b_planner_at_least_as_good_as_hand_tuned():
    """FlexGen's hand-tuned OPT-175B policy on the T4 (--percent 0 50 0 0 0 100, 32 x 8) against the
    planner, both under flexjob's cost model, with and without compression allowed."""
    cfg, hw = preset("175b"), t4_flexgen()
    budgets = dict(gpu_mem_gib=16, cpu_mem_gib=200, disk_mem_gib=1500)
    hand = Policy.from_percents([0, 50, 0, 0, 0, 100], gpu_batch_size=32, num_gpu_batches=8)
    hand_est = estimate(cfg, hw, hand, prompt_len=512, gen_len=32)
    assert hand_est.fits(budgets_bytes(hw, 16, 200, 1500))
    for options in ((False,), (False, True)):
        result = plan(cfg, hw, **budgets, prompt_len=512, gen_len=32, compress_options=options,
                      gpu_batch_sizes=(1, 8, 16, 32), num_gpu_batches=(1, 8, 32))
        assert result.tokens_per_s >= hand_est.tokens_per_s
