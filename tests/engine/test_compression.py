"""Group-wise quantisation: the round-trip bound, packing density, serialisation, cache slicing."""
from __future__ import annotations

import math

import pytest
import torch

from engine.runtime.compression import (ALIGN, QuantizedTensor, dequantize, from_bytes, packed_nbytes,
                                quantize, to_bytes)
from engine.model import int4_matmul
from engine.model.kernels import linear
from engine.model.config import preset
from engine.model.config import hf_tensor_shapes

# (shape, dim, group_size): multiples and non-multiples of the group, 1-D, 3-D, cache-like 4-D.
CASES = [
    ((256, 128), -1, 64),    # nn.Linear [out, in]
    ((37, 100), -1, 64),     # in not a multiple of the group
    ((1000,), 0, 64),        # 1-D, 15 full groups + 40
    ((63,), -1, 64),         # one partial group
    ((5, 7, 130), -1, 64),   # 3-D
    ((2, 4, 9, 64), -1, 64),  # KV cache [B, H, S, D], groups along head_dim
    ((2, 3, 11, 80), 3, 64),  # head_dim not a multiple of the group
    ((96, 40), 0, 32),       # grouped along the first dimension
    ((3, 50, 6), 1, 16),     # grouped along a middle dimension
    ((10, 33), -1, 7),       # odd group size: packing pads each group
]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def per_element(q: QuantizedTensor, group_values: torch.Tensor) -> torch.Tensor:
    """[*lead, n_groups] -> q.shape: each element gets its group's value."""
    length = q.shape[q.dim]
    expanded = group_values.float().repeat_interleave(q.group_size, dim=-1)[..., :length]
    return expanded.movedim(-1, q.dim)


def round_trip_tolerance(q: QuantizedTensor, x: torch.Tensor, y: torch.Tensor, dtype) -> torch.Tensor:
    """|y - x| bound per element, y = dequantize(quantize(x), dtype).

    The quantiser stores the minimum m rounded down and the step s rounded up to fp16, so the grid
    m + [0, 2**bits - 1] * s covers the group's range and the nearest code is within s/2 — with s the
    stored fp16 step (which is the exact step (max-min)/levels enlarged by at most one fp16 rounding).
    On top: dequantisation computes code * s + m in `dtype` with unit roundoff u: s and m are
    rounded to dtype (u each), the product and the sum rounded (u each), so |error| grows by at most
    u * (2 * levels * s + |m| + |y|); and the quantiser's own float32 division can move a code at an
    exact tie (2**-22 * levels * s). The factor 1.001 covers second-order terms.
    """
    s, m = per_element(q, q.scale), per_element(q, q.minimum)
    levels = 2**q.num_bits - 1
    u = UNIT_ROUNDOFF[dtype]
    arithmetic = u * (2 * levels * s + m.abs() + y.float().abs()) + 2.0**-22 * (levels * s + x.abs())
    return 1.001 * (s / 2 + arithmetic)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape, dim, group", CASES)
def test_round_trip_within_half_a_step(shape, dim, group, bits):
    gen = torch.Generator().manual_seed(hash((shape, dim, group, bits)) % 2**31)
    # Mixed scales: groups of tiny and of large values, and an offset so minima are not ~ -max.
    x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(4) * 10 + 0.5
    q = quantize(x, num_bits=bits, group_size=group, dim=dim)
    for dtype in (torch.float32, torch.bfloat16):
        y = dequantize(q, dtype)
        assert y.shape == x.shape and y.dtype == dtype
        err = (y.float() - x).abs()
        bound = round_trip_tolerance(q, x, y, dtype)
        assert (err <= bound).all(), f"{dtype}: worst excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stored_step_is_the_tight_min_max_step(bits):
    # The bound above is only meaningful if s is the group's own (max - min) / levels, not larger.
    x = torch.randn(64, 256)
    q = quantize(x, num_bits=bits)
    groups = x.view(64, 4, 64)
    exact = (groups.amax(-1) - groups.amin(-1)) / (2**bits - 1)
    fp16_slack = 2.0**-10 * (exact + groups.amin(-1).abs() / (2**bits - 1)) + 2.0**-24
    assert (q.scale.float() >= exact).all()
    assert (q.scale.float() <= exact + fp16_slack).all()
    assert (q.minimum.float() <= groups.amin(-1)).all()


def test_constant_groups_do_not_divide_by_zero():
    x = torch.cat([torch.zeros(2, 64), torch.full((2, 64), 0.1), torch.full((2, 64), -3.0),
                   torch.randn(2, 64)])
    q = quantize(x)
    y = dequantize(q, torch.float32)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:2], x[:2]) and torch.equal(y[4:6], x[4:6])  # exact in fp16: exact
    assert (y[2:4] - x[2:4]).abs().max() <= 2.0**-10 * 0.1  # 0.1 within its fp16 rounding
    assert (q.scale[[0, 1, 4, 5]] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(dtype):
    x = torch.randn(8, 128).to(dtype)
    q = quantize(x)
    y = dequantize(q, torch.float32)
    assert ((y - x.float()).abs() <= round_trip_tolerance(q, x.float(), y, torch.float32)).all()


def test_rejects_values_it_cannot_represent():
    for bad in (float("nan"), float("inf"), 1e6):
        x = torch.randn(4, 64)
        x[1, 3] = bad
        with pytest.raises(ValueError):
            quantize(x)
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 64), num_bits=9)
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 64), dim=2)


@pytest.mark.parametrize("bits, bytes_per_group", [(2, 16), (3, 32), (4, 32), (5, 64), (8, 64)])
def test_packing_density(bits, bytes_per_group):
    q = quantize(torch.randn(16, 256), num_bits=bits)
    assert q.data.dtype == torch.uint8 and q.data.shape == (16, 4, bytes_per_group)
    assert q.scale.dtype == q.minimum.dtype == torch.float16 and q.scale.shape == (16, 4)


def test_codes_use_the_whole_grid():
    # Every random group has its minimum at code 0 and its maximum at the top code (4 bits: 15).
    q = quantize(torch.randn(32, 128))
    codes = torch.cat([q.data & 15, q.data >> 4], dim=-1)  # planar layout: [lo codes | hi codes]
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()


def test_opt_1_3b_store_is_at_least_3_4x_smaller_than_fp16():
    fp16 = packed = matrices_fp16 = matrices_packed = 0
    for _, shape in hf_tensor_shapes(preset("1.3b")):
        n = 2 * math.prod(shape)
        fp16 += n
        if len(shape) >= 2:  # as FlexGen: matrices compressed, 1-D biases and LayerNorms stay fp16
            packed += packed_nbytes(shape, 4, 64, -1)
            matrices_fp16 += n
            matrices_packed += packed_nbytes(shape, 4, 64, -1)
        else:
            packed += n
    assert matrices_fp16 / matrices_packed == pytest.approx(16 / 4.5, rel=1e-3)  # 3.556
    assert fp16 / packed >= 3.4


@pytest.mark.parametrize("shape, dim, group", CASES)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_serialisation_round_trip(shape, dim, group, bits):
    x = torch.randn(shape)
    q = quantize(x, num_bits=bits, group_size=group, dim=dim)
    blob = to_bytes(q)
    assert blob.dtype == torch.uint8 and blob.numel() == packed_nbytes(shape, bits, group, dim)
    assert blob.numel() % ALIGN == 0
    # A larger buffer (e.g. rounded up for O_DIRECT) works, and views share its memory.
    buf = torch.full((blob.numel() + 4096,), 0xAB, dtype=torch.uint8)
    to_bytes(q, out=buf)
    back = from_bytes(buf, shape, num_bits=bits, group_size=group, dim=dim)
    assert back.data.data_ptr() == buf.data_ptr()
    for name in ("data", "scale", "minimum"):
        assert torch.equal(getattr(back, name), getattr(q, name))
    assert (back.shape, back.dim, back.num_bits, back.group_size) == (q.shape, q.dim, bits, group)
    assert torch.equal(dequantize(back), dequantize(q))
    assert torch.equal(from_bytes(blob.clone(), shape, num_bits=bits, group_size=group, dim=dim).data,
                       q.data)


def test_quantize_into_a_preallocated_buffer():
    x = torch.randn(40, 200)
    buf = torch.empty(packed_nbytes(x.shape), dtype=torch.uint8)
    q = quantize(x, out=from_bytes(buf, x.shape))
    assert q.data.data_ptr() == buf.data_ptr()
    assert torch.equal(buf, to_bytes(quantize(x)))
    with pytest.raises(ValueError):
        quantize(torch.randn(40, 100), out=q)


def test_from_bytes_rejects_a_short_buffer():
    with pytest.raises(ValueError):
        from_bytes(torch.empty(packed_nbytes((8, 64)) - 1, dtype=torch.uint8), (8, 64))


@pytest.mark.parametrize("shape, dim", [((32, 128), -1), ((4, 2, 5, 80), -1), ((64, 12), 0)])
def test_dequantize_into_out(shape, dim):
    q = quantize(torch.randn(shape), dim=dim)
    out = torch.empty(shape, dtype=torch.bfloat16)
    assert dequantize(q, torch.bfloat16, out=out) is out
    assert torch.equal(out, dequantize(q, torch.bfloat16))
    with pytest.raises(ValueError):
        dequantize(q, torch.float32, out=out)


def test_large_tensors_are_processed_in_chunks_identically():
    # More rows than one chunk: chunk boundaries must not change a single value.
    import engine.runtime.compression as compression
    x = torch.randn(300, 192)
    whole_q, whole_y = quantize(x), dequantize(quantize(x))
    old = compression._CHUNK_ELEMENTS
    compression._CHUNK_ELEMENTS = 1000
    try:
        q = quantize(x)
        assert torch.equal(q.data, whole_q.data) and torch.equal(q.scale, whole_q.scale)
        assert torch.equal(dequantize(q), whole_y)
    finally:
        compression._CHUNK_ELEMENTS = old


def test_cache_slices_along_the_sequence_axis():
    # A KV cache [B, H, S, D] grouped along head_dim: each token is quantised on its own, so the
    # engine can quantise one step's K/V and write it into a preallocated compressed cache.
    cache = torch.randn(2, 4, 10, 64)
    q = quantize(cache)
    step = quantize(cache[:, :, 7:8])
    assert torch.equal(q.data[:, :, 7:8], step.data)
    assert torch.equal(q.scale[:, :, 7:8], step.scale) and torch.equal(q.minimum[:, :, 7:8], step.minimum)
    buf = torch.empty(packed_nbytes(cache.shape), dtype=torch.uint8)
    store = from_bytes(buf, cache.shape)
    for s in range(10):
        part = quantize(cache[:, :, s:s + 1])
        store.data[:, :, s:s + 1] = part.data
        store.scale[:, :, s:s + 1] = part.scale
        store.minimum[:, :, s:s + 1] = part.minimum
    assert torch.equal(dequantize(store), dequantize(q))


fused = pytest.mark.skipif(not int4_matmul.available(), reason="this torch has no fused CPU int4 matmul")


def _codes(q):
    """Each element's 4-bit code, recovered from the dequantised values (not from the packing)."""
    n, k = q.shape
    scale = q.scale.float().repeat_interleave(q.group_size, dim=1)
    minimum = q.minimum.float().repeat_interleave(q.group_size, dim=1)
    step = torch.where(scale == 0, 1.0, scale)
    return ((dequantize(q, torch.float32) - minimum) / step).round().to(torch.int32).view(n, k)


@fused
@pytest.mark.parametrize("out_features", [64, 96, 112, 192])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_repacking_equals_torchs_own_int4_packing(out_features, group):
    q = quantize(torch.randn(out_features, 256), group_size=group)
    expected = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes(q), 1)
    assert torch.equal(int4_matmul.pack(q).packed.reshape(-1), expected.reshape(-1))


@fused
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_fused_linear_matches_dequantised_weight_within_bf16_rounding(group):
    torch.manual_seed(group)
    w = 0.02 * torch.randn(192, 512) + 0.01 * torch.randn(192, 1)  # [out, in], groups off zero too
    bias = torch.randn(192).to(torch.bfloat16)
    q = quantize(w, group_size=group)
    x = torch.randn(7, 512).to(torch.bfloat16)
    y = int4_matmul.linear(x, int4_matmul.pack(q), bias).float()
    deq = dequantize(q, torch.float32)
    ref = x.float() @ deq.T + bias.float()
    # The kernel takes scale and zero (= minimum + 8 scale) in bf16 and rounds its result to bf16:
    # each weight is off by at most 2^-9 (|zero| + 8 |scale|), the sum by 2^-9 of itself (+ bias).
    scale = q.scale.float().repeat_interleave(group, dim=1)
    weight_error = 2 ** -9 * ((q.minimum.float().repeat_interleave(group, dim=1) + 8 * scale).abs() + 8 * scale)
    tol = x.float().abs() @ weight_error.T + 2 ** -8 * (ref.abs() + bias.float().abs())
    assert ((y - ref).abs() <= tol).all()
    assert (y - ref).abs().max() > 0  # the fused path really ran (bf16 output)


@fused
def test_fused_linear_rows_do_not_depend_on_the_batch():
    # A row's output is the same bits whether it is alone, first, last, or among other rows.
    torch.manual_seed(3)
    weight = int4_matmul.pack(quantize(torch.randn(320, 1024), group_size=64))
    x = torch.randn(300, 1024).to(torch.bfloat16)  # more rows than one call takes
    whole = int4_matmul.linear(x, weight)
    for size in (1, 2, 3, 4, 5, 9, 16, 33, 259):
        for start in (0, 1, 37 - size % 37):
            assert torch.equal(int4_matmul.linear(x[start:start + size], weight), whole[start:start + size])
    others = torch.randn(6, 1024).to(torch.bfloat16)
    for r in (0, 17, 36, 299):
        batch = torch.cat((others[:r % 5], x[r:r + 1], others))
        assert torch.equal(int4_matmul.linear(batch, weight)[r % 5], whole[r])
        assert torch.equal(int4_matmul.linear(x[r].view(1, 1, -1), weight).view(-1), whole[r])


@fused
@pytest.mark.parametrize("out_features", [192, 2064])  # 2064: a narrower last block, as a vocabulary's
def test_dequantised_copy_holds_the_kernels_own_weights(out_features):
    # The kernel times an identity matrix gives each weight it uses, rounded to bf16 once.
    torch.manual_seed(out_features)
    weight = int4_matmul.pack(quantize(torch.randn(out_features, 256), group_size=64))
    kernels_weights = int4_matmul.linear(torch.eye(256, dtype=torch.bfloat16), weight).t()
    assert torch.equal(int4_matmul.dequantize(weight, elements_per_pass=1000), kernels_weights)
    assert torch.equal(int4_matmul.dequantize(weight), kernels_weights)


@fused
def test_prompt_tokens_multiply_the_dequantised_copy_and_keep_their_role():
    # Prompt tokens run on the library over the dequantised weight, generated tokens on the fused
    # kernel; in a mixed call each row gets its role's bits, whatever its neighbours.
    torch.manual_seed(5)
    weight = int4_matmul.pack(quantize(0.05 * torch.randn(320, 512), group_size=64))
    bias = torch.randn(320).to(torch.bfloat16)
    x = torch.randn(40, 512).to(torch.bfloat16)
    as_prompt, as_generated = linear(x, weight, bias, True), linear(x, weight, bias, False)
    assert torch.equal(as_generated, int4_matmul.linear(x, weight, bias))
    assert torch.equal(as_prompt, linear(x, int4_matmul.dequantize(weight), bias, True))
    assert not torch.equal(as_prompt, as_generated)  # two computations, really
    mask = torch.arange(40) % 3 == 0
    mixed = linear(x, weight, bias, mask)
    assert torch.equal(mixed[mask], as_prompt[mask]) and torch.equal(mixed[~mask], as_generated[~mask])


def test_fused_kernel_takes_only_what_it_can_compute():
    cpu = torch.device("cpu")
    assert not int4_matmul.fits((96, 256), 3, 64, torch.bfloat16, cpu)       # 3 bits
    assert not int4_matmul.fits((96, 256), 4, 64, torch.float32, cpu)        # float32 activations
    assert not int4_matmul.fits((96, 250), 4, 50, torch.bfloat16, cpu)       # group size
    assert not int4_matmul.fits((100, 256), 4, 64, torch.bfloat16, cpu)      # out % 16
    assert int4_matmul.fits((96, 256), 4, 64, torch.bfloat16, cpu) == int4_matmul.available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.randn(3, 4, 37, 80)
    q_cpu = quantize(x)
    q_gpu = quantize(x.cuda())
    assert q_gpu.data.is_cuda and q_gpu.scale.is_cuda
    assert torch.equal(q_gpu.data.cpu(), q_cpu.data) and torch.equal(q_gpu.scale.cpu(), q_cpu.scale)
    for dtype in (torch.float16, torch.float32):
        y = dequantize(q_gpu, dtype)
        assert y.is_cuda
        tol = round_trip_tolerance(q_cpu, x, y.cpu(), dtype)
        assert ((y.cpu().float() - x).abs() <= tol).all()
    blob = to_bytes(q_gpu)
    assert torch.equal(blob, to_bytes(q_cpu))
