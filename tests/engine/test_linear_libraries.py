"""Prompt tokens and generated tokens may go to different math libraries (float32 on a CPU: MKL for
the prefill's thousands of rows, oneDNN for a decode step's few), and a token's numbers then depend
on its role only: every row gets, bit for bit, what it gets alone in a call of its own role, also
when a resumed row's saved tokens sit beside prompt tokens in one step. F.linear in float64 is the
oracle for values; the engine-level proof (every policy and resume point gives the same ids) is
tests/engine/test_invariance.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import packed_weight
from engine.model.kernels import gated_mlp, linear, pack_for_cpu, prefill_library_differs, relu_mlp

CPU = torch.device("cpu")
two_libraries = pytest.mark.skipif(not prefill_library_differs(torch.zeros(1, 1), torch.float32, CPU),
                                   reason="this torch build has one float32 library (no oneDNN linear)")


def _operands(seed: int, rows: int, shape=(384, 256)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, shape[1], generator=gen), torch.randn(shape, generator=gen),
            torch.randn(shape[0], generator=gen))


@pytest.mark.parametrize("prompt", [True, False], ids=["prompt", "generated"])
def test_each_role_gives_a_row_the_same_bits_at_every_call_size(prompt):
    x, w, b = _operands(1, 4100)
    whole = linear(x, w, b, prompt)
    for start, count in ((0, 1), (5, 7), (100, 32), (0, 600), (2000, 2100)):
        assert torch.equal(linear(x[start:start + count], w, b, prompt), whole[start:start + count]), (start, count)
    torch.testing.assert_close(whole.double(), F.linear(x.double(), w.double(), b.double()), rtol=1e-4, atol=1e-3)


def test_a_step_mixing_prompt_and_saved_tokens_gives_each_token_its_roles_bits():
    """A resumed block's prefill: rows [B, S] whose last few positions are saved generated tokens."""
    x, w, b = _operands(2, 3 * 40)
    x = x.view(3, 40, -1)
    prompt = torch.ones(3, 40, dtype=torch.bool)
    prompt[1, 30:] = False  # row 1 resumed after 10 saved tokens
    prompt[2, 39:] = False  # row 2 after one
    got = linear(x, w, b, prompt)
    want = torch.where(prompt[..., None], linear(x, w, b, True), linear(x, w, b, False))
    assert torch.equal(got, want)
    assert torch.equal(got[1, 30:], linear(x[1, 30:], w, b, False))  # as its decode steps computed them
    assert torch.equal(linear(x, w, b, torch.ones(3, 40, dtype=torch.bool)), linear(x, w, b, True))


@two_libraries
def test_the_two_libraries_round_differently_here_so_the_role_matters():
    """Where prefill_library_differs, sending a saved token to the prefill library would change its
    bits: this is what makes test_invariance's resume checks a test of the routing."""
    x, w, b = _operands(3, 256, shape=(768, 768))
    prefill, decode = linear(x, w, b, True), linear(x, w, b, False)
    assert not torch.equal(prefill, decode)
    torch.testing.assert_close(prefill, decode, rtol=1e-4, atol=1e-4)


@two_libraries
def test_float32_matrices_stay_plain_where_the_prefill_reads_them_with_mkl():
    weight = torch.randn(256, 128)
    assert pack_for_cpu(weight) is weight
    if packed_weight.packable(torch.zeros(2, 2, dtype=torch.bfloat16)):
        assert isinstance(pack_for_cpu(weight.bfloat16()), packed_weight.PackedWeight)  # one library there


def _bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else oneDNN emulates it, many times slower)."""
    flags = open("/proc/cpuinfo").read().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not _bf16_native(), reason="bfloat16 is emulated on this CPU (no AVX512-BF16 or AMX)"))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("held", ["plain", "packed"])
@pytest.mark.parametrize("prompt", [True, False], ids=["prompt", "generated"])
def test_relu_inside_the_call_gives_the_bits_of_relu_after_it(dtype, held, prompt):
    # oneDNN applies it to the float accumulator before rounding; rounding keeps signs, so the
    # result is max(0, rounded) bit for bit, for each role and each way a matrix is held.
    x, w, b = (t.to(dtype) for t in _operands(4, 300))
    weight = pack_for_cpu(w) if held == "packed" else w
    fused = linear(x, weight, b, prompt, relu=True)
    assert torch.equal(fused, linear(x, weight, b, prompt).relu_())
    assert (fused == 0).any() and (fused > 0).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_a_transposed_view_and_a_contiguous_matrix_of_one_shape_keep_their_own_size_checks(dtype):
    # The library picks kernels by the weight's layout too (AMX, bf16: a [K, N] buffer read as its
    # transpose agrees at other call sizes than a contiguous [N, K] matrix), so a size found usable
    # for one layout must not be taken for the other.
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(700, 2048, generator=gen).to(dtype)
    contiguous = torch.randn(6144, 2048, generator=gen).to(dtype)
    transposed = torch.randn(2048, 6144, generator=gen).to(dtype).t()
    for weight in (transposed, contiguous):
        for prompt in (True, False):
            whole = linear(x, weight, None, prompt)
            for start, count in ((0, 1), (3, 7), (10, 40), (5, 300)):
                assert torch.equal(linear(x[start:start + count], weight, None, prompt), whole[start:start + count])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_size_checks_made_during_the_planners_calibration_hold_for_real_weights(dtype):
    """The call-size checks run on the first matrix of a shape and are remembered for the shape; the
    planner's calibration multiplies matrices of the model's shapes first. A matrix of one repeated
    value passes every size (AMX, bf16, opt-1.3b's 2048 x 2048: 1024-row calls differ from 256-row
    ones in ~1e-4 of the outputs on real weights), so the calibration's must be random: afterwards a
    real matrix still gives each prompt row, at every call size, the bits of its reference."""
    from engine.model.config import preset
    from engine.planning.calibration import _layer_weights

    calibrated = _layer_weights(preset("1.3b", num_layers=1), CPU, dtype)["self_attn.q_proj.weight"]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1024, 2048, generator=gen).to(dtype)
    linear(x, calibrated, torch.zeros(2048, dtype=dtype), True)  # the checks run here, first
    weight = pack_for_cpu((torch.randn(2048, 2048, generator=gen) * 0.02).to(dtype))
    assert type(weight) is type(calibrated)
    bias = torch.randn(2048, generator=gen).to(dtype)
    whole = linear(x, weight, bias, True)
    for start, count in ((0, 256), (256, 256), (0, 8), (512, 512)):
        assert torch.equal(linear(x[start:start + count], weight, bias, True), whole[start:start + count]), (start, count)


def _mlps(family: str, hold, dtype: torch.dtype, gen: torch.Generator):
    """(the MLP chunk by chunk, the same MLP as its layers one after the other on whole batches)."""
    if family == "opt":  # linear(relu(linear(x, up)), down)
        up, down = (hold(torch.randn(shape, generator=gen).to(dtype)) for shape in ((1024, 256), (256, 1024)))
        up_bias, down_bias = (torch.randn(n, generator=gen).to(dtype) for n in (1024, 256))
        return (lambda x, prompt: relu_mlp(x, up, up_bias, down, down_bias, prompt),
                lambda x, prompt: linear(linear(x, up, up_bias, prompt, relu=True), down, down_bias, prompt))
    gate, up, down = (hold((torch.randn(shape, generator=gen) * 0.1).to(dtype))  # Llama's down(silu(gate(x)) * up(x))
                      for shape in ((768, 256), (768, 256), (256, 768)))
    return (lambda x, prompt: gated_mlp(x, gate, up, down, prompt),
            lambda x, prompt: linear(F.silu(linear(x, gate, None, prompt)).mul_(linear(x, up, None, prompt)),
                                     down, None, prompt))


@pytest.mark.parametrize("family", ["opt", "llama"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("held", ["plain", "packed"])
@pytest.mark.parametrize("prompt", [True, False], ids=["prompt", "generated"])
def test_the_mlp_chunk_by_chunk_gives_the_bits_of_its_layers_one_after_the_other(family, dtype, held, prompt):
    gen = torch.Generator().manual_seed(8)
    chained, layers = _mlps(family, pack_for_cpu if held == "packed" else (lambda w: w), dtype, gen)
    for rows in (1, 300, 1100):
        x = torch.randn(rows, 256, generator=gen).to(dtype)
        assert torch.equal(chained(x, prompt), layers(x, prompt)), rows
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[:, :290] = True  # a resumed row's saved tokens beside prompt tokens: each group its role's way
    x = torch.randn(2, 300, 256, generator=gen).to(dtype)
    assert torch.equal(chained(x, mask), layers(x, mask))
