"""One memory model: every plan the planner returns passes the engine's own budget check
(engine.runtime.budgets), and runs within its budget when actually run (whole-process peak RSS,
measured in a fresh process); 4-bit weights and cache count at their packed size."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import psutil
import pytest
import torch

from engine.errors import BudgetError
from engine.model.checkpoint import WeightStore
from engine.model.config import preset
from engine.model.synthetic import make_model
from engine.planning.cost_inputs import compression_factor
from engine.planning.hardware import HardwareProfile
from engine.planning.planner import plan
from engine.runtime.budgets import GIB, StoreLayout, check_budgets, estimate_memory
from engine.runtime.devices import torch_dtype
from engine.runtime.policy import CompressionConfig, Policy
from tests.engine.test_planner import _random_hardware

SIZES = ("125m", "350m", "1.3b", "6.7b", "30b", "175b", "llama-1b", "llama-8b")
SMALL = dict(gpu_batch_sizes=(1, 4, 16), num_gpu_batches=(1, 4))
PROCESS_GROWTH_GIB = 0.03  # as jobrunner.worker.replan reserves: what the process may add before the check


def _hardware(rng: random.Random) -> HardwareProfile:
    """test_planner's random hosts; half the CPU-only ones compute in float32 (4-byte tensors)."""
    hw = _random_hardware(rng)
    if not hw.has_gpu and rng.random() < 0.5:
        flops = hw.matmul_flops["cpu"]["bfloat16"] / 3
        hw = hw.replace(compute_dtype="float32", matmul_flops={"cpu": {"float32": flops}})
    return hw


def _case(rng: random.Random):
    """A preset shrunk to a few layers (the planner is exercised on real widths), hardware, budgets
    between a quarter and all of the model's bytes, a workload."""
    cfg = preset(rng.choice(SIZES), num_layers=rng.choice((2, 4, 8)))
    hw = _hardware(rng)
    model_gib = 2 * cfg.param_count() / GIB
    reserved = psutil.Process().memory_info().rss / GIB + PROCESS_GROWTH_GIB
    gpu = model_gib * rng.uniform(0.1, 1.0) + 0.2 if hw.has_gpu else None
    cpu = reserved + model_gib * rng.uniform(0.25, 1.2) + 0.1
    work = dict(prompt_len=rng.choice((16, 128, 512)), gen_len=rng.choice((4, 32)),
                compress_options=rng.choice(((False,), (True,), (False, True))))
    return cfg, hw, gpu, cpu, reserved, work


def test_every_plan_passes_the_engine_budget_check():
    """20 random cases; a case whose budgets are too small is planned again with the smallest budget
    the planner's refusal names, so every case yields a plan for the engine to check."""
    rng = random.Random(16)
    retried = 0
    for _ in range(20):
        cfg, hw, gpu, cpu, reserved, work = _case(rng)
        try:
            result = plan(cfg, hw, gpu_mem_gib=gpu, cpu_mem_gib=cpu, cpu_reserved_gib=reserved, **SMALL, **work)
        except BudgetError as refusal:
            retried += 1
            gpu, cpu = refusal.smallest_gib.get("gpu", gpu), refusal.smallest_gib.get("cpu", cpu)
            result = plan(cfg, hw, gpu_mem_gib=gpu, cpu_mem_gib=cpu, cpu_reserved_gib=reserved, **SMALL, **work)
        pol = result.policy
        layout = StoreLayout.of(cfg, pol.compression if pol.compress_weight else None)
        device = torch.device("cuda" if hw.has_gpu else "cpu")
        est = check_budgets(cfg, layout, pol, device, torch_dtype(hw.compute_dtype), gpu, cpu,
                            prompt_len=work["prompt_len"], gen_len=work["gen_len"])  # raises if over
        # The plan reports the figure the engine checks (the process as the planner reserved it).
        assert result.peak_gib["cpu"] == pytest.approx((est.cpu_total - est.cpu["process"]) / GIB + reserved,
                                                       abs=0.02)
        if hw.has_gpu:
            assert result.peak_gib["gpu"] == pytest.approx(est.gpu_total / GIB)
    assert retried <= 10


def test_the_budget_a_refusal_names_is_accepted_whatever_the_process_holds():
    """The refusal's smallest CPU budget for one of the cases above (opt-6.7b x 8 layers, float32),
    with the process's own memory swept finely: the planner must accept it every time. The exact
    peaks move in whole slots, so the LP's first placement under a bigger budget can miss where a
    smaller budget fits (seen at 1.156 and 1.166 GiB held by the process)."""
    rng = random.Random(16)
    cfg, hw, _, _, _, work = [_case(rng) for _ in range(2)][1]
    assert (cfg.name, cfg.num_layers, hw.compute_dtype) == ("opt-6.7b", 8, "float32")
    for step in range(21):
        reserved = 1.15 + step * 0.001
        with pytest.raises(BudgetError) as refusal:
            plan(cfg, hw, gpu_mem_gib=None, cpu_mem_gib=reserved + 1.95, cpu_reserved_gib=reserved, **SMALL, **work)
        named = refusal.value.smallest_gib["cpu"]
        result = plan(cfg, hw, gpu_mem_gib=None, cpu_mem_gib=named, cpu_reserved_gib=reserved, **SMALL, **work)
        assert result.peak_gib["cpu"] <= named


@pytest.mark.parametrize("compression", [None, CompressionConfig()])
def test_store_layout_sizes_a_converted_store(tmp_path, compression):
    cfg = preset("125m", num_layers=2, hidden_size=256)
    model = make_model(cfg, tmp_path / "m", with_tokenizer=False)
    store = WeightStore.open_or_convert(model, cfg, tmp_path / "store", compression=compression)
    layout = StoreLayout.of(cfg, compression)
    assert {k: [(e.name, e.shape, e.nbytes, e.num_bits) for e in v] for k, v in store.layers.items()} == \
           {k: [(e.name, e.shape, e.nbytes, e.num_bits) for e in v] for k, v in layout.layers.items()}


def test_a_compressed_cache_counts_at_its_packed_size():
    cfg = preset("1.3b")
    plain = Policy(gpu_batch_size=64, num_gpu_batches=1, weights_gpu_percent=0, weights_cpu_percent=100,
                   cache_gpu_percent=0, cache_cpu_percent=100, activations_gpu_percent=0,
                   activations_cpu_percent=100)
    packed = plain.replace(compress_cache=True)
    sizes = [estimate_memory(cfg, StoreLayout.of(cfg), p, torch.device("cpu"), torch.float16, prompt_len=128,
                             gen_len=32, process_bytes=0).cpu for p in (plain, packed)]
    # opt-1.3b, 64 rows x 159 positions: 0.52 GiB packed; uncompressed in memory, attention's
    # aligned layout holds 192 positions (159 rounded up to 64): 2.25 GiB in fp16.
    positions, held = 128 + 32 - 1, 192
    ratio = sizes[1]["kv cache"] / (sizes[0]["kv cache"] * positions / held)
    assert ratio == pytest.approx(compression_factor(CompressionConfig()), rel=0.01)  # 0.28 at 4 bit, group 64
    assert sizes[0]["kv cache"] / GIB == pytest.approx(24 * 64 * 2 * 2048 * 2 * held / GIB, abs=0.01)
    assert sizes[1]["kv cache"] / GIB == pytest.approx(0.52, abs=0.01)


CHILD = r"""
import json, sys
import psutil, torch
from engine.errors import BudgetError
from engine.model.config import load_config
from engine.planning.hardware import HardwareProfile
from engine.planning.planner import plan
from engine.runtime.budgets import GIB, StoreLayout, check_budgets, estimate_memory
from engine.runtime.devices import resolve_dtype
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput
model, offload, mode, arg, prompt_len = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
cfg, cpu, gen_len = load_config(model), torch.device("cpu"), 4
rss, refused = psutil.Process().memory_info().rss, None
if mode in ("plan", "plan-compressed"):  # arg: GiB of budget above this process's memory
    hw = HardwareProfile.from_json(sys.argv[6])
    budget = rss / GIB + arg
    policy = plan(cfg, hw, gpu_mem_gib=None, cpu_mem_gib=budget, prompt_len=prompt_len, gen_len=gen_len,
                  gpu_batch_sizes=(1, 4, 8), num_gpu_batches=(1, 2), compress_options=(mode != "plan",),
                  cpu_reserved_gib=rss / GIB + 0.03).policy
elif mode == "weights-on-disk":  # arg rows, 4-bit weights all read from disk; the budget: what the engine counts
    policy = Policy(gpu_batch_size=int(arg), num_gpu_batches=1, weights_gpu_percent=0, weights_cpu_percent=0,
                    cache_gpu_percent=0, cache_cpu_percent=100, activations_gpu_percent=0,
                    activations_cpu_percent=100, compress_weight=True)
    est = estimate_memory(cfg, StoreLayout.of(cfg, policy.compression), policy, cpu, resolve_dtype(None, cpu),
                          prompt_len=prompt_len, gen_len=gen_len)
    budget, refused = est.cpu_total / GIB + 0.03, json.dumps(est.cpu)
else:  # arg rows, all in RAM, cache compressed; the budget halfway between its needs with and without
    policy = Policy(gpu_batch_size=int(arg), num_gpu_batches=1, weights_gpu_percent=0, weights_cpu_percent=100,
                    cache_gpu_percent=0, cache_cpu_percent=100, activations_gpu_percent=0,
                    activations_cpu_percent=100, compress_cache=True)
    need = [estimate_memory(cfg, StoreLayout.of(cfg), p, cpu, resolve_dtype(None, cpu), prompt_len=prompt_len,
                            gen_len=gen_len).cpu_total for p in (policy, policy.replace(compress_cache=False))]
    budget = (need[0] + need[1]) / 2 / GIB
    try:
        check_budgets(cfg, StoreLayout.of(cfg), policy.replace(compress_cache=False), cpu, resolve_dtype(None, cpu),
                      None, budget, prompt_len=prompt_len, gen_len=gen_len)
    except BudgetError as e:
        refused = str(e)
with Engine(model, policy, offload_dir=offload, cpu_mem_gib=budget) as engine:
    rows = [RowInput(row_id=i, prompt_ids=tuple(2 + (i * 31 + j) % 5000 for j in range(prompt_len)))
            for i in range(policy.block_size)]
    engine.generate(rows, GenerationParams(max_new_tokens=gen_len))
    print(json.dumps({"policy": policy.describe(), "peak": engine.stats.peak_rss_bytes, "budget": budget * GIB,
                      "refused": refused}))
"""

HOST = HardwareProfile(host="test", disk_read_gbps=1.0, disk_write_gbps=1.0, cpu_mem_gbps=18,
                       matmul_flops={"cpu": {"bfloat16": 4e11, "float32": 1.4e11}}, cpu_attention_gbps=20,
                       dequant_gbps=20, cpu_mem_gib=23, disk_free_gib=50)


def _run_child(model, tmp_path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(tmp_path / "offload"), *args],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(out["policy"], "peak GiB", out["peak"] / GIB, "budget GiB", out["budget"] / GIB)
    return out


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return make_model(preset("125m", num_layers=2), tmp_path_factory.mktemp("m") / "opt", with_tokenizer=False)


@pytest.mark.parametrize("mode,margin_gib", [("plan", 0.2), ("plan-compressed", 0.3)])
def test_planned_runs_stay_within_their_budget(small_model, tmp_path, mode, margin_gib):
    """Budgets just above this model's floor (0.3 GiB of weights in 16-bit with the head's copy; in
    float32, the default on a CPU without native bf16, twice that, so the margin doubles; in bf16
    the plan streams some weights from disk): the planner fits a policy, and the engine, checking
    with its own figures, accepts it and keeps within it."""
    from engine.runtime.devices import default_dtype_name
    hw = HOST.replace(compute_dtype=default_dtype_name())
    margin_gib *= 2 if hw.compute_dtype == "float32" else 1
    out = _run_child(small_model, tmp_path, mode, str(margin_gib), "32", hw.to_json())
    assert out["peak"] <= out["budget"]


def test_4bit_weights_read_from_disk_need_no_dequantised_copies(small_model, tmp_path):
    """Where a kernel multiplies the 4-bit matrices as they are read (bfloat16 or float32 on a CPU),
    the budget counts their read buffers and prompt tokens' copy of one matrix, not a dequantised
    copy per layer and of the head (the head alone would be 0.14 GiB in float32 here), and a run
    held to that budget stays within it."""
    from engine.model.four_bit import four_bit_kernel
    from engine.runtime.devices import resolve_dtype
    cpu = torch.device("cpu")
    dtype = resolve_dtype(None, cpu)
    if four_bit_kernel((64, 64), 4, 64, dtype, cpu) is None:
        pytest.skip(f"no 4-bit kernel for {dtype} on this CPU: matrices are dequantised per layer")
    out = _run_child(small_model, tmp_path, "weights-on-disk", "4", "32")
    head_copy = preset("125m").vocab_size * 768 * torch.empty((), dtype=dtype).element_size()
    assert json.loads(out["refused"])["streamed weights"] < head_copy / 2
    assert out["peak"] <= out["budget"]


def test_a_run_that_fits_only_compressed_stays_within_its_budget(tmp_path):
    """Cache-heavy (24 layers of width 256, 16 rows x 512 positions: the cache is 0.2 GiB, 4-bit
    0.05): the uncompressed cache does not fit the budget, the 4-bit one does, and the run stays
    within it. The budget sits halfway between the two needs, measured before the engine loads;
    what loading adds to the process beside the weights (20-30 MB: the math library's state) must
    stay well inside that half."""
    model = make_model(preset("125m", num_layers=24, hidden_size=256), tmp_path / "m", with_tokenizer=False)
    out = _run_child(model, tmp_path, "cache", "16", "512")
    assert out["refused"] and "kv cache" in out["refused"]
    assert out["peak"] <= out["budget"]


TRIM_SCRIPT = r"""
import json, psutil, torch
from engine.model.config import preset
from engine.runtime.budgets import GIB, StoreLayout, check_budgets, configure_allocator
from engine.runtime.policy import Policy
configure_allocator(512 << 20)
rss = lambda: psutil.Process().memory_info().rss
held = torch.ones(300 << 20, dtype=torch.uint8)
del held  # freed into the heap, which keeps it for reuse
kept = rss()
cfg, cpu = preset("125m"), torch.device("cpu")
policy = Policy(gpu_batch_size=1, num_gpu_batches=1, weights_gpu_percent=0, weights_cpu_percent=100,
                cache_gpu_percent=0, cache_cpu_percent=100, activations_gpu_percent=0, activations_cpu_percent=100)
check = lambda budget: check_budgets(cfg, StoreLayout.of(cfg), policy, cpu, torch.float32, None, budget,
                                     prompt_len=8, gen_len=2)
need = check(None).cpu_total
after_unbudgeted = rss()
within = check(need / GIB + 0.5)  # room to spare: the heap is left as it is
after_within = rss()
tight = check((need - (200 << 20)) / GIB)  # fits only once the freed 300 MB go back to the system
print(json.dumps({"kept": kept, "after_unbudgeted": after_unbudgeted, "after_within": after_within,
                  "after_tight": rss(), "need": need, "tight_need": tight.cpu_total}))
"""


def test_the_budget_check_returns_freed_heap_memory_only_where_the_budget_needs_it():
    """Freed heap memory that the allocator keeps counts as the process's own; the check trims it
    (malloc_trim) only when the budget would fail with it, then passes on what is left."""
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert got["after_unbudgeted"] > got["kept"] - 50 * mib  # no budget: nothing returned
    assert got["after_within"] > got["kept"] - 50 * mib  # within the budget: nothing returned
    assert got["after_tight"] < got["kept"] - 250 * mib  # the 300 MB went back to the system
    assert got["tight_need"] < got["need"] - 250 * mib  # and the check counted the process without them
