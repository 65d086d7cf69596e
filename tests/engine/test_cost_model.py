"""The cost model: units, compression, overlap, CPU-only folding, and float/numpy agreement."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.planning.cost_inputs import (CACHE_DISK_PART_OPS, GB, GIB, Placement, Shape, compression_factor, four_bit_prompt_copy,
                                         head_weight_bytes, layer_weight_bytes, sizes, weight_split)
from engine.planning.cost_model import block_time, estimate, traffic_per_token
from engine.planning.cost_memory import peak_bytes
from engine.planning.cost_time import phase_terms
from engine.planning.hardware import PREFILL_KEPT, HardwareProfile, t4_flexgen
from engine.model.config import preset
from engine.runtime.policy import CompressionConfig, Policy

CPU_HOST = HardwareProfile(disk_read_gbps=1.1, disk_write_gbps=1.3, cpu_mem_gbps=18.0,
                           matmul_flops={"cpu": {"bfloat16": 4e11, "float32": 1.4e11}},
                           cpu_attention_gbps=10.0, dequant_gbps=5.0, cpu_mem_gib=23, disk_free_gib=100)


def test_compression_factor_is_bits_over_16_plus_two_bytes_per_group_value():
    # 4 bit + an fp16 min and scale per 64 elements, against 2 bytes per element.
    assert compression_factor(CompressionConfig()) == pytest.approx(0.25 + 4 / 64 / 2)
    assert compression_factor(CompressionConfig(num_bits=8, group_size=32)) == pytest.approx(0.5 + 2 / 32)


def stored_fp16_bytes(cfg) -> int:
    """What the engine's weight store holds (fp16), from its own tensor list."""
    import math

    from engine.model.checkpoint import layer_names, layer_tensor_specs
    return sum(2 * math.prod(shape) for layer in layer_names(cfg) for _, shape in layer_tensor_specs(cfg, layer))


def test_weight_bytes_add_up_to_what_the_engine_stores():
    cfg = preset("1.3b")
    total = cfg.num_layers * layer_weight_bytes(cfg) + head_weight_bytes(cfg)
    # The checkpoint's parameters plus the store's own copy of the tied output head.
    assert total == stored_fp16_bytes(cfg) == 2 * (cfg.param_count() + cfg.vocab_size * cfg.embed_dim)


def test_all_on_disk_peak_is_the_model_plus_cache():
    cfg = preset("1.3b")
    pol = Policy.from_percents([0, 0, 0, 0, 0, 0], gpu_batch_size=4, num_gpu_batches=2)
    est = estimate(cfg, CPU_HOST, pol, prompt_len=64, gen_len=16)
    cache = cfg.num_layers * 8 * (64 + 16) * 2 * cfg.hidden_size * 2
    act = 8 * 64 * cfg.hidden_size * 2
    assert est.peak_gib["disk"] * GIB == pytest.approx(stored_fp16_bytes(cfg) + cache + act)
    assert est.bottleneck == "disk"


def _both(size: str, first: list, second: list, *, prompt_len: int, gen_len: int, gpu_batch_size: int = 8):
    """Estimates of two percent settings of the same shape on the CPU host."""
    cfg = preset(size)
    return [estimate(cfg, CPU_HOST, Policy.from_percents(pct, gpu_batch_size=gpu_batch_size),
                     prompt_len=prompt_len, gen_len=gen_len) for pct in (first, second)]


def test_cpu_host_folds_gpu_share_into_ram_and_links_cost_nothing():
    a, b = _both("350m", [100, 0, 100, 0, 100, 0], [0, 100, 0, 100, 0, 100], prompt_len=32, gen_len=8)
    assert a.tokens_per_s == pytest.approx(b.tokens_per_s)
    assert a.peak_gib == pytest.approx(b.peak_gib)
    assert a.peak_gib["gpu"] == 0 and a.decode_terms_s["cpu_to_gpu"] == 0 and a.decode_terms_s["disk"] == 0


def test_overlap_is_max_and_no_overlap_is_sum():
    cfg = preset("1.3b")
    pol = Policy.from_percents([0, 50, 0, 100, 0, 100], gpu_batch_size=8, num_gpu_batches=4)
    over = estimate(cfg, CPU_HOST, pol, prompt_len=128, gen_len=8)
    serial = estimate(cfg, CPU_HOST, pol.replace(overlap=False), prompt_len=128, gen_len=8)
    sh = Shape.from_policy(pol, prompt_len=128, gen_len=8)
    layer = phase_terms(cfg, CPU_HOST, sh, Placement.from_policy(pol), decode=True)[0][1]
    assert serial.decode_step_s > over.decode_step_s
    n_layers = cfg.num_layers
    assert over.decode_step_s >= n_layers * max(layer.values())
    assert serial.decode_step_s >= n_layers * sum(layer.values())


def test_compression_cuts_disk_traffic_by_its_factor():
    cfg = preset("6.7b")
    pol = Policy.from_percents([0, 0, 0, 100, 0, 100], gpu_batch_size=4)
    plain = traffic_per_token(cfg, CPU_HOST, pol, prompt_len=32, gen_len=8)["disk_read"]
    packed = traffic_per_token(cfg, CPU_HOST, pol.replace(compress_weight=True), prompt_len=32, gen_len=8)["disk_read"]
    assert packed / plain == pytest.approx(compression_factor(CompressionConfig()))


def test_more_on_disk_is_slower_and_uses_less_ram():
    a, b = _both("1.3b", [0, 100, 0, 100, 0, 100], [0, 40, 0, 100, 0, 100], prompt_len=64, gen_len=16)
    assert b.tokens_per_s < a.tokens_per_s and b.peak_gib["cpu"] < a.peak_gib["cpu"]


def test_cpu_attention_removes_cache_traffic_to_the_gpu():
    cfg = preset("30b")
    hw = t4_flexgen()
    pol = Policy.from_percents([100, 0, 0, 100, 100, 0], gpu_batch_size=32, num_gpu_batches=2)
    moved = estimate(cfg, hw, pol, prompt_len=256, gen_len=16)
    delegated = estimate(cfg, hw, pol.replace(cpu_cache_compute=True), prompt_len=256, gen_len=16)
    assert delegated.decode_terms_s["cpu_to_gpu"] < moved.decode_terms_s["cpu_to_gpu"] / 100
    assert delegated.decode_terms_s["compute"] > moved.decode_terms_s["compute"]


def test_numpy_and_float_evaluations_agree():
    cfg, hw = preset("13b"), t4_flexgen()
    sh = Shape(gpu_batch_size=8, num_gpu_batches=3, prompt_len=128, gen_len=16, cpu_cache_compute=True)
    rng = np.random.default_rng(1)
    raw = rng.dirichlet([1, 1, 1], size=(3, 5))  # 3 kinds x 5 samples x (g, c, d)
    xs = Placement(wg=raw[0, :, 0], wc=raw[0, :, 1], wd=raw[0, :, 2], cg=raw[1, :, 0], cc=raw[1, :, 1],
                   cd=raw[1, :, 2], hg=raw[2, :, 0], hc=raw[2, :, 1], hd=raw[2, :, 2])
    vec_t = block_time(cfg, hw, sh, xs)
    vec_p = peak_bytes(cfg, hw, sh, xs)
    for i in range(5):
        xi = Placement(**{k: float(getattr(xs, k)[i]) for k in ("wg", "wc", "wd", "cg", "cc", "cd", "hg", "hc", "hd")})
        assert float(block_time(cfg, hw, sh, xi)) == pytest.approx(vec_t[i])
        for tier, v in peak_bytes(cfg, hw, sh, xi).items():
            assert float(v) == pytest.approx(np.asarray(vec_p[tier])[i])


def test_profile_json_round_trip(tmp_path):
    hw = t4_flexgen()
    path = hw.save(tmp_path / "t4.json")
    assert HardwareProfile.load(path) == hw
    assert hw.with_links({"disk_read": 0.1}).disk_read_gbps == 0.1


def test_measured_linear_table_interpolates_and_drives_the_compute_term():
    table = {"1": 1e-10, "32": 2e-10, "2048": 4e-9}
    hw = HardwareProfile(cpu_mem_gbps=20, matmul_flops={"cpu": {"bfloat16": 1e12}}, linear_s_per_byte=table)
    assert hw.linear_seconds(1, 1e6) == pytest.approx(1e-4)
    assert hw.linear_seconds(0.5, 1e6) == pytest.approx(1e-4)  # below the table: its first row
    assert hw.linear_seconds(32, 1e6) == pytest.approx(2e-4)
    # Between rows: a power law (sqrt(32 * 2048) = 256 is the geometric midpoint): the geometric mean.
    assert hw.linear_seconds(256, 1e6) == pytest.approx((2e-10 * 4e-9) ** 0.5 * 1e6)
    # Time proportional to the rows (compute-bound) is interpolated exactly, flat time too.
    proportional = HardwareProfile(linear_s_per_byte={"512": 1e-9, "2048": 4e-9})
    assert proportional.linear_seconds(1024, 1e6) == pytest.approx(2e-9 * 1e6)
    assert HardwareProfile(linear_s_per_byte={"1": 1e-10, "8": 1e-10}).linear_seconds(4, 1e6) == pytest.approx(1e-4)
    assert hw.linear_seconds(4096, 1e6) == pytest.approx(8e-3)  # beyond: compute-bound, grows with rows
    assert HardwareProfile().linear_seconds(32, 1e6) is None

    # The decode compute of an all-RAM layer is one call over the layer's weights with the whole
    # block's rows (2 micro-batches of 32: one bf16 call of 64 rows, not two of 32), plus fixed op
    # costs and attention; the roofline does not apply.
    cfg, policy = preset("1.3b"), Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=32,
                                                       num_gpu_batches=2)
    sh, x = Shape.from_policy(policy, prompt_len=128, gen_len=8), Placement.from_policy(policy)
    slow = hw.replace(linear_s_per_byte={k: 2 * v for k, v in table.items()})
    (_, fast_layer), _ = phase_terms(cfg, hw, sh, x, decode=True)
    (_, slow_layer), _ = phase_terms(cfg, slow, sh, x, decode=True)
    weights = 2 * cfg.layer_param_count()  # bf16 bytes
    assert slow_layer["compute"] - fast_layer["compute"] == pytest.approx(hw.linear_seconds(64, weights))
    (_, prefill_fast), _ = phase_terms(cfg, hw, sh, x, decode=False)
    (_, prefill_slow), _ = phase_terms(cfg, slow, sh, x, decode=False)
    # A prefill runs micro-batch by micro-batch: two calls of 32 x 128 rows.
    assert prefill_slow["compute"] - prefill_fast["compute"] == pytest.approx(
        2 * hw.linear_seconds(32 * 128, weights), rel=1e-6)


def test_matrices_streamed_from_disk_compute_at_the_streamed_table_on_a_cpu():
    """The CPU engine holds the matrices it keeps in RAM packed and multiplies streamed ones plain:
    the share of a decoder layer on disk computes at the streamed table's rate, the rest at the
    held one's (a profile without a streamed table: the same for both)."""
    held = {"1": 1e-10, "32": 2e-10, "2048": 4e-9}
    hw = HardwareProfile(cpu_mem_gbps=20, matmul_flops={"cpu": {"bfloat16": 1e12}}, linear_s_per_byte=held,
                         disk_read_gbps=100, disk_write_gbps=100)
    slower = hw.replace(linear_streamed_s_per_byte={k: 1.5 * v for k, v in held.items()})
    assert slower.linear_seconds(32, 1e6, streamed=True) == pytest.approx(1.5 * hw.linear_seconds(32, 1e6))
    assert hw.linear_seconds(32, 1e6, streamed=True) == hw.linear_seconds(32, 1e6)
    cfg = preset("1.3b")
    weights = 2 * cfg.layer_param_count()  # bf16 bytes of one decoder layer
    for percents in ([0, 100, 0, 100, 0, 100], [0, 50, 0, 100, 0, 100]):
        policy = Policy.from_percents(percents, gpu_batch_size=32, num_gpu_batches=1)
        sh, x = Shape.from_policy(policy, prompt_len=128, gen_len=8), Placement.from_policy(policy)
        (_, same), _ = phase_terms(cfg, hw, sh, x, decode=True)
        (_, streamed), _ = phase_terms(cfg, slower, sh, x, decode=True)
        on_disk = weight_split(cfg, x).layers_on_disk  # the decoder layers' share (tables go first)
        assert on_disk == 0 if percents[1] == 100 else 0.3 < on_disk < 0.5
        extra = 0.5 * hw.linear_seconds(32, weights) * on_disk
        assert streamed["compute"] - same["compute"] == pytest.approx(extra, rel=1e-6, abs=1e-12)


def test_generated_tokens_over_4bit_matrices_compute_at_the_4bit_kernel_table():
    """Where a 4-bit kernel multiplies every matrix (cost_inputs.four_bit_prompt_copy), a decode step's
    layer computes at the measured 4-bit table, every row of the block in one call; the prefill
    multiplies prompt tokens' dequantised copy at the dense table; without the 4-bit table, the dense one."""
    dense = {"1": 1e-10, "32": 2e-10, "2048": 4e-9}
    four = {"1": 5e-11, "32": 1e-10, "128": 3e-10}
    hw = HardwareProfile(cpu_mem_gbps=20, matmul_flops={"cpu": {"bfloat16": 1e12}}, linear_s_per_byte=dense,
                         compute_dtype="bfloat16")
    with_table = hw.replace(linear_4bit_s_per_byte=four)
    assert with_table.linear_seconds(32, 1e6, four_bit=True) == pytest.approx(1e-4)
    assert hw.linear_seconds(32, 1e6, four_bit=True) == hw.linear_seconds(32, 1e6)
    cfg = preset("1.3b")
    policy = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=32, num_gpu_batches=2,
                                  compress_weight=True)
    sh, x = Shape.from_policy(policy, prompt_len=128, gen_len=8), Placement.from_policy(policy)
    if four_bit_prompt_copy(cfg, sh, hw) is None:
        pytest.skip("no 4-bit kernel for bfloat16 on this CPU: its matrices are dequantised every step")
    weights = 2 * cfg.layer_param_count()  # bf16 bytes of one decoder layer
    (_, without), _ = phase_terms(cfg, hw, sh, x, decode=True)
    (_, measured), _ = phase_terms(cfg, with_table, sh, x, decode=True)
    assert measured["compute"] - without["compute"] == pytest.approx(
        with_table.linear_seconds(64, weights, four_bit=True) - hw.linear_seconds(64, weights), rel=1e-6)
    (_, prefill_without), _ = phase_terms(cfg, hw, sh, x, decode=False)
    (_, prefill_measured), _ = phase_terms(cfg, with_table, sh, x, decode=False)
    assert prefill_measured["compute"] == pytest.approx(prefill_without["compute"])


def test_compute_scale_multiplies_layer_compute_and_cpu_conversion_does_not_overlap():
    cfg = preset("1.3b")
    hw = HardwareProfile(cpu_mem_gbps=20, disk_read_gbps=2, convert_gbps=4, compute_dtype="bfloat16",
                         matmul_flops={"cpu": {"bfloat16": 1e12}})
    ram = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=32)
    sh, x = Shape.from_policy(ram, prompt_len=128, gen_len=8), Placement.from_policy(ram)
    for decode, phase in ((False, "prefill"), (True, "decode")):
        base = phase_terms(cfg, hw, sh, x, decode=decode)[0][1]["compute"]
        scaled = phase_terms(cfg, hw.replace(compute_scale={phase: 1.5}), sh, x, decode=decode)[0][1]["compute"]
        assert scaled == pytest.approx(1.5 * base)
    # Weights streamed from disk are converted fp16 -> fp32 by the same two cores that compute: on a
    # CPU-only host that time is compute, not hidden under the disk read. In bfloat16 they are read
    # from a copy converted once (engine.runtime.converted_files): nothing to convert per step.
    disk = Policy.from_percents([0, 0, 0, 100, 0, 100], gpu_batch_size=32)
    sh, x = Shape.from_policy(disk, prompt_len=128, gen_len=8), Placement.from_policy(disk)
    fp32 = hw.replace(compute_dtype="float32", matmul_flops={"cpu": {"float32": 1e12}})
    layer = phase_terms(cfg, fp32, sh, x, decode=True)[0][1]
    no_convert = phase_terms(cfg, fp32.replace(convert_gbps=0.0), sh, x, decode=True)[0][1]
    assert layer["disk"] == pytest.approx(no_convert["disk"])
    assert layer["compute"] - no_convert["compute"] == pytest.approx(4 * cfg.layer_param_count() / 4e9)  # fp32 bytes out
    assert phase_terms(cfg, hw, sh, x, decode=True) == phase_terms(cfg, hw.replace(convert_gbps=0.0), sh, x,
                                                                   decode=True)


def test_a_prefill_is_priced_at_the_kept_rate_only_where_the_cpu_budget_leaves_room_to_keep_freed_blocks():
    # The engine keeps a prefill's freed intermediates where its CPU budget has room beside the
    # peak (budgets.freed_bytes_to_keep), else it faults each in anew in every layer: the profile's
    # two calibration points.
    cfg = preset("1.3b")
    hw = HardwareProfile(cpu_mem_gbps=20, disk_read_gbps=2, compute_dtype="bfloat16",
                         matmul_flops={"cpu": {"bfloat16": 1e12}},
                         compute_scale={"prefill": 2.0, PREFILL_KEPT: 1.0, "decode": 1.0})
    ram = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=16)
    unlimited = estimate(cfg, hw, ram, prompt_len=128, gen_len=8)
    peak = unlimited.peak_gib["cpu"]
    roomy, full = (estimate(cfg, hw, ram, prompt_len=128, gen_len=8, cpu_budget_gib=budget)
                   for budget in (peak + 1.0, peak))
    assert unlimited.prefill_s == roomy.prefill_s  # room enough: kept
    assert 1.95 < full.prefill_s / roomy.prefill_s < 2.0  # no room: faulted (the head is not a layer)
    assert full.decode_step_s == roomy.decode_step_s == unlimited.decode_step_s  # decode allocates little
    # A profile measured before the kept point existed prices every prefill at the faulting rate.
    older = hw.replace(compute_scale={"prefill": 2.0, "decode": 1.0})
    assert estimate(cfg, older, ram, prompt_len=128, gen_len=8).prefill_s == full.prefill_s


def test_io_interference_charges_compute_for_disk_time_only_without_a_gpu():
    cfg = preset("1.3b")
    hw = HardwareProfile(cpu_mem_gbps=20, disk_read_gbps=2, convert_gbps=4, compute_dtype="bfloat16",
                         matmul_flops={"cpu": {"bfloat16": 1e12}})
    # 5 % in RAM: more than the lookup tables and decoder layers on disk, so the head streams too.
    pol = Policy.from_percents([0, 5, 0, 0, 0, 100], gpu_batch_size=32)
    sh, x = Shape.from_policy(pol, prompt_len=128, gen_len=8), Placement.from_policy(pol, cfg.num_heads)
    for decode in (False, True):
        base = phase_terms(cfg, hw, sh, x, decode=decode)
        slowed = phase_terms(cfg, hw.replace(io_compute_interference=0.25), sh, x, decode=decode)
        for (_, b), (_, s) in zip(base, slowed):  # the decoder layer and the head
            assert s["disk"] == pytest.approx(b["disk"]) and b["disk"] > 0
            assert s["compute"] - b["compute"] == pytest.approx(0.25 * b["disk"])
    # With a GPU the cores that run the I/O thread are not the ones that compute.
    gpu = hw.replace(gpu_name="x", cpu_to_gpu_gbps=10, gpu_to_cpu_gbps=10, gpu_mem_gbps=500,
                     matmul_flops={"cuda": {"bfloat16": 1e14}, "cpu": {"bfloat16": 1e12}})
    base = phase_terms(cfg, gpu, sh, x, decode=True)[0][1]
    assert phase_terms(cfg, gpu.replace(io_compute_interference=0.25), sh, x, decode=True)[0][1] == base


def test_scale_for_interpolates_between_timed_row_counts():
    hw = HardwareProfile(compute_scale={"prefill": 0.9, "decode": 0.5, "decode:1": 2.0, "decode:64": 0.5},
                         model_compute_scale={"mine": {"prefill": 1.2, "head:8": 3.0}})
    assert hw.scale_for("other", "decode", 1) == 2.0 and hw.scale_for("other", "decode", 64) == 0.5
    assert hw.scale_for("other", "decode", 8) == pytest.approx(2.0 - 0.5 * 1.5)  # half way in log rows
    assert hw.scale_for("other", "decode", 256) == 0.5 and hw.scale_for("other", "prefill", 99) == 0.9
    assert hw.scale_for("other", "head", 8) == 1.0  # never timed: the kernels' sum as is
    assert hw.scale_for("mine", "prefill", 8) == 1.2 and hw.scale_for("mine", "head", 2) == 3.0
    assert hw.scale_for("mine", "decode", 8) == 1.0  # a model's own entry replaces the generic one whole


def test_a_prefill_is_scaled_at_its_micro_batch_tokens():
    # The calibration times prefill micro-batches of several sizes ("prefill:T", T tokens); a plan's
    # prefill takes the scale at its own rows x prompt length, whatever the split of rows and tokens.
    cfg = preset("1.3b")
    hw = HardwareProfile(cpu_mem_gbps=20, disk_read_gbps=2, compute_dtype="bfloat16",
                         matmul_flops={"cpu": {"bfloat16": 1e12}})
    timed = hw.replace(compute_scale={"prefill:1024": 1.0, "prefill:4096": 2.0, "prefill": 1.0, "decode": 1.0})

    def prefill_compute(profile, rows, prompt_len):
        pol = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=rows)
        sh, x = Shape.from_policy(pol, prompt_len=prompt_len, gen_len=8), Placement.from_policy(pol)
        return phase_terms(cfg, profile, sh, x, decode=False)[0][1]["compute"]

    for rows, prompt_len, scale in ((8, 128, 1.0), (32, 128, 2.0), (8, 512, 2.0), (16, 128, 1.5), (1, 128, 1.0)):
        assert prefill_compute(timed, rows, prompt_len) == pytest.approx(scale * prefill_compute(hw, rows, prompt_len))


def test_a_cpu_decode_step_reads_whole_key_groups_and_copies_a_disk_cache_into_the_aligned_layout():
    """On a CPU, decode attention reads every context rounded up to KEY_ALIGN keys, and a cache part
    on disk is copied into attention's aligned layout each step (read and written once, at the
    memory stream rate); a part in RAM is read in place."""
    hw = HardwareProfile(cpu_mem_gbps=20, cpu_attention_gbps=10, matmul_flops={"cpu": {"float32": 1e11}},
                         disk_read_gbps=1, disk_write_gbps=1, io_compute_interference=0.0, compute_dtype="float32")
    cfg = preset("1.3b")
    ram = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=16, num_gpu_batches=2)
    disk = Policy.from_percents([0, 100, 0, 0, 0, 100], gpu_batch_size=16, num_gpu_batches=2)
    sh = Shape.from_policy(ram, prompt_len=128, gen_len=32)
    z = sizes(cfg, sh, hw)
    # Contexts 129 .. 159 all read 192 keys (3 groups of 64), against an average context of 144.
    assert z.kv_att16 == pytest.approx(z.kv_dec16 * 192 / 144)
    (_, in_ram), _ = phase_terms(cfg, hw, sh, Placement.from_policy(ram), decode=True)
    (_, on_disk), _ = phase_terms(cfg, hw, sh, Placement.from_policy(disk), decode=True)
    part_ops = 2 * CACHE_DISK_PART_OPS * hw.op_overhead_s  # each of the 2 micro-batches' disk parts
    assert on_disk["compute"] - in_ram["compute"] == pytest.approx(2 * z.kv_dec16 / (20 * GB) + part_ops)


def test_a_sliver_of_cache_on_disk_costs_each_slot_its_requests_and_ops_and_the_planner_weighs_that():
    """A cache slot with a part on disk costs its per-step ops and requests whatever the part's size
    (8x4 blocks of opt-1.3b with 1 % of the cache on disk measured 0.076 s a step more than all in
    RAM): the planner keeps the whole cache in memory where that fits, even when the LP's linear
    terms would find a sliver on disk free."""
    hw = HardwareProfile(cpu_mem_gbps=20, cpu_attention_gbps=10, matmul_flops={"cpu": {"bfloat16": 1e12}},
                         disk_read_gbps=2, disk_write_gbps=2, disk_read_latency_s=5e-5, disk_write_latency_s=1e-4,
                         io_compute_interference=0.0, compute_dtype="bfloat16", cpu_attention_in_place=True)
    cfg = preset("1.3b")
    ram = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=8, num_gpu_batches=4)
    sliver = Policy.from_percents([0, 100, 0, 99, 0, 100], gpu_batch_size=8, num_gpu_batches=4)
    sh = Shape.from_policy(ram, prompt_len=128, gen_len=32)
    (_, in_ram), _ = phase_terms(cfg, hw, sh, Placement.from_policy(ram, cfg.num_kv_heads), decode=True)
    (_, on_disk), _ = phase_terms(cfg, hw, sh, Placement.from_policy(sliver, cfg.num_kv_heads), decode=True)
    assert on_disk["compute"] - in_ram["compute"] >= 4 * CACHE_DISK_PART_OPS * hw.op_overhead_s
    assert on_disk["disk"] - in_ram["disk"] >= 4 * (5e-5 + 1e-4)
    # The planner prices a disk part as the estimate does: its LP's block time for the plan it
    # picks under a budget that sends something to disk matches the estimate of that plan.
    from engine.planning.planner import plan
    peak = estimate(cfg, hw, ram, prompt_len=128, gen_len=32).peak_gib["cpu"]
    for budget in (peak + 1.0, peak - 0.3):
        picked = plan(cfg, hw, gpu_mem_gib=None, cpu_mem_gib=budget, prompt_len=128, gen_len=32,
                      gpu_batch_sizes=(8,), num_gpu_batches=(4,), compress_options=(False,))
        assert picked.estimate.total_s == pytest.approx(picked.lp_objective_s, rel=0.02)
        assert budget < peak or picked.policy.cache_cpu_percent == 100


def test_a_cpu_that_attends_in_place_reads_each_context_and_copies_no_disk_cache():
    """With the native kernel a decode step's attention reads each pair's own context, from RAM or
    from the buffer a disk read filled, at the measured attention rate: a part on disk costs its
    read, no copy."""
    hw = HardwareProfile(cpu_mem_gbps=20, cpu_attention_gbps=10, matmul_flops={"cpu": {"float32": 1e11}},
                         disk_read_gbps=1, disk_write_gbps=1, io_compute_interference=0.0, compute_dtype="float32",
                         cpu_attention_in_place=True)
    library = dataclasses.replace(hw, cpu_attention_in_place=False)
    cfg = preset("1.3b")
    ram = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=16, num_gpu_batches=2)
    disk = Policy.from_percents([0, 100, 0, 0, 0, 100], gpu_batch_size=16, num_gpu_batches=2)
    sh = Shape.from_policy(ram, prompt_len=128, gen_len=32)
    z = sizes(cfg, sh, hw)
    (_, in_ram), _ = phase_terms(cfg, hw, sh, Placement.from_policy(ram), decode=True)
    (_, on_disk), _ = phase_terms(cfg, hw, sh, Placement.from_policy(disk), decode=True)
    (_, library_in_ram), _ = phase_terms(cfg, library, sh, Placement.from_policy(ram), decode=True)
    assert on_disk["compute"] == pytest.approx(in_ram["compute"] + 2 * CACHE_DISK_PART_OPS * hw.op_overhead_s)
    assert library_in_ram["compute"] - in_ram["compute"] == pytest.approx((z.kv_att16 - z.kv_dec16) / (10 * GB))
