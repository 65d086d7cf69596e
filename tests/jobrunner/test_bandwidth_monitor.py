"""The bandwidth monitor: a throttled disk leads to a re-plan that moves bytes off it; noise does not."""
from __future__ import annotations

import pytest

from engine.planning.cost_model import traffic_per_token
from engine.planning.hardware import HardwareProfile
from engine.runtime.tiers import DISK_READ, DISK_WRITE
from engine.model.config import preset
from engine.planning.planner import plan
from jobrunner.worker.bandwidth_monitor import BandwidthMonitor

HW = HardwareProfile(disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                     matmul_flops={"cpu": {"bfloat16": 4e11}}, cpu_attention_gbps=10.0, dequant_gbps=5.0,
                     cpu_mem_gib=23, disk_free_gib=100)
CFG = preset("1.3b")
WORK = dict(prompt_len=128, gen_len=32)
ENUM = dict(gpu_batch_sizes=(1, 4, 16, 64), num_gpu_batches=(1, 2, 4, 8), compress_options=(False,))
BUDGETS = dict(gpu_mem_gib=None, cpu_mem_gib=3.0)  # opt-1.3b in bf16 needs 3.7 GiB all in RAM


def _monitor(**kw) -> BandwidthMonitor:
    start = plan(CFG, HW, **BUDGETS, **WORK, **ENUM)
    return BandwidthMonitor(config=CFG, hardware=HW, policy=start.policy, **BUDGETS, **WORK,
                            plan_kwargs=ENUM, **kw)


def _block(read_gbps: float, nbytes: float = 2e9) -> dict[str, tuple[float, float]]:
    return {DISK_READ: (nbytes, nbytes / (read_gbps * 1e9)), DISK_WRITE: (0, 0.0)}


def test_throttled_disk_leads_to_a_replan_that_reads_less_from_it():
    mon = _monitor()
    old = mon.policy
    assert traffic_per_token(CFG, HW, old, **WORK)["disk_read"] > 0  # the start plan uses the disk
    for _ in range(3):
        assert mon.observe(_block(1.05)) is None  # within 30 % of the profile
    # The start plan streams part of its cache; the all-RAM re-plan must gain the 10 % margin (at a
    # quarter of the bandwidth it gains 9 %).
    slow = HW.disk_read_gbps / 6
    assert mon.observe(_block(slow)) is None  # one block is not a trend
    decision = mon.observe(_block(slow))
    assert decision is not None and decision.apply
    assert decision.drifted_links == (DISK_READ,)
    assert abs(decision.measured_gbps[DISK_READ] - slow) < 1e-9
    assert decision.profiled_gbps[DISK_READ] == HW.disk_read_gbps
    assert decision.predicted_gain >= 0.10
    assert decision.old_policy == old and decision.new_policy == mon.policy != old
    before = traffic_per_token(CFG, HW, old, **WORK)["disk_read"]
    after = traffic_per_token(CFG, HW, decision.new_policy, **WORK)["disk_read"]
    assert after < before or decision.new_policy.block_size != old.block_size
    event = decision.to_event()
    assert event["applied"] and event["measured_gbps"][DISK_READ] == decision.measured_gbps[DISK_READ]
    # The slow disk is now the reference: staying slow re-plans nothing.
    for _ in range(4):
        assert mon.observe(_block(slow)) is None


def test_a_single_noisy_block_is_not_a_replan():
    mon = _monitor()
    for gbps in (1.1, 0.05, 1.1, 1.0, 30.0, 1.1, 1.2, 0.1, 1.1):  # isolated spikes both ways
        assert mon.observe(_block(gbps)) is None
    assert mon.last_check is None  # not even an LP solve


def test_small_transfers_and_unknown_links_are_ignored():
    mon = _monitor()
    for _ in range(5):
        assert mon.observe({DISK_READ: (1000, 1.0), "nvlink": (5e9, 100.0), "cpu_to_gpu": (5e9, 100.0)}) is None
    assert all(state.ewma is None for state in mon.links.values())  # nothing measured


def test_no_decision_when_the_new_plan_is_not_better_by_the_margin():
    # Everything fits in RAM: a slower disk changes nothing worth a re-plan.
    start = plan(CFG, HW, gpu_mem_gib=None, cpu_mem_gib=16, **WORK, **ENUM)
    mon = BandwidthMonitor(config=CFG, hardware=HW, policy=start.policy, gpu_mem_gib=None, cpu_mem_gib=16,
                           **WORK, plan_kwargs=ENUM)
    for _ in range(3):
        assert mon.observe(_block(0.2)) is None
    assert mon.last_check is not None and not mon.last_check.apply



@pytest.mark.slow
def test_throttled_engine_replans_and_output_stays_identical(tmp_path):
    """A real engine run, block by block: the disk is capped at the profile's 0.2 GB/s, then at a
    quarter of it from the third block on. The monitor re-plans, set_policy applies it at the block
    boundary, the disk reads drop, and greedy output equals that of an unthrottled run."""
    from engine.runtime.engine import Engine
    from engine.model.synthetic import make_model
    from engine.runtime.policy import Policy
    from engine.runtime.rows import GenerationParams, RowInput

    cfg = preset("125m", num_layers=4, hidden_size=512)  # 6 MB per layer: disk reads big enough to time
    model = tmp_path / "model"
    make_model(cfg, model, with_tokenizer=False)  # rows are token ids already
    hw = HW.replace(disk_read_gbps=0.2)
    start = Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=2, num_gpu_batches=1)
    work = dict(prompt_len=8, gen_len=4)
    params = GenerationParams(max_new_tokens=4)
    rows = [RowInput(row_id=i, prompt_ids=tuple(2 + (i * 131 + j * 7) % 50000 for j in range(8)))
            for i in range(12)]  # six blocks: the last one runs after the re-placement's own reads
    mon = BandwidthMonitor(config=cfg, hardware=hw, policy=start, gpu_mem_gib=None, cpu_mem_gib=8, **work,
                           plan_kwargs=dict(gpu_batch_sizes=(2,), num_gpu_batches=(1,), compress_options=(False,)))
    decisions, reads, outputs = [], [], []
    with Engine(model, start, offload_dir=tmp_path / "off", throttle_gbps={DISK_READ: 0.2}) as eng:
        for k in range(0, len(rows), 2):
            if k == 4:
                eng.set_throttle({DISK_READ: 0.05})  # the test knob: a slower disk mid-run
            outputs += eng.generate(rows[k:k + 2], params)
            transfers = eng.stats.blocks[-1].transfers
            reads.append(transfers.get(DISK_READ, (0, 0.0))[0])
            decision = mon.observe(transfers)
            if decision is not None:
                decisions.append(decision)
                eng.set_policy(decision.new_policy)
    assert len(decisions) == 1 and decisions[0].block_index == 3, [d.to_event() for d in decisions]
    assert decisions[0].measured_gbps[DISK_READ] < 0.07
    assert decisions[0].new_policy.weights_cpu_percent > start.weights_cpu_percent
    assert reads[-1] < reads[0] / 2, (reads, decisions[0].new_policy.describe())
    with Engine(model, start, offload_dir=tmp_path / "off2") as eng:
        reference = eng.generate(rows, params)
    assert [r.generated_ids for r in outputs] == [r.generated_ids for r in reference]
