"""The 4-bit kernel for bfloat16 activations (engine.model.int4_bfloat16), on each of its paths this
CPU runs (AMX tiles, AVX512-BF16 dot products): it multiplies exactly compression.dequantize's
float32 weights rounded to bfloat16, agrees with a float64 product to the output's rounding, gives a
row the same bits in every call, and the engine hands it the stored bytes of every 4-bit matrix,
held or streamed."""
from __future__ import annotations

import pytest
import torch

from engine.model import four_bit, int4_bfloat16
from engine.runtime.compression import QuantizedTensor, dequantize, quantize
from engine.runtime.engine import Engine
from engine.runtime.policy import CompressionConfig, Policy
from engine.runtime.weight_tiers import ROW_LOOKUP_TABLES

pytestmark = pytest.mark.skipif(not int4_bfloat16.available(),
                                reason="no C compiler, or a CPU without AVX512-BF16 (torch's int4 kernel runs there)")
PATHS = int4_bfloat16.paths()


def _matrix(n: int, k: int, group: int, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=gen) * 0.05).half(), num_bits=4, group_size=group, dim=-1)


def _weights(q: QuantizedTensor) -> torch.Tensor:
    return dequantize(q, torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n, k, group", [(64, 256, 64), (32, 1024, 32), (96, 512, 256), (32, 384, 128),
                                         (32, 2304, 64)])
def test_the_kernel_multiplies_exactly_the_dequantised_weights(n, k, group, path):
    """x = the identity: each output is one weight times 1 plus exact zeros."""
    q = _matrix(n, k, group)
    got = int4_bfloat16.linear(torch.eye(k, dtype=torch.bfloat16), q, path=path)
    assert torch.equal(got, _weights(q).t())
    assert torch.equal(int4_bfloat16.dequantize(q), _weights(q))  # prompt tokens' copy: the same weights


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 2, 15, 17, 32, 33, 64])
def test_the_kernel_agrees_with_a_float64_product(rows, path):
    q = _matrix(128, 2048, 64, seed=rows)
    gen = torch.Generator().manual_seed(1)
    x, bias = torch.randn(rows, 2048, generator=gen).bfloat16(), torch.randn(128, generator=gen).bfloat16()
    expected = x.double() @ _weights(q).double().t() + bias.double()
    got = int4_bfloat16.linear(x, q, bias, path=path)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 128)
    # one bfloat16 rounding of the float32 sum: half an ulp (2^-8 relative), plus float32 summation error
    torch.testing.assert_close(got.double(), expected, rtol=2 ** -8, atol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_a_row_has_the_same_bits_in_every_call(path):
    """Alone, at any place among 1..70 rows, on one thread or two: the same bits (K = 2304 spans
    more than one of the dot path's blocks of inputs)."""
    q = _matrix(96, 2304, 64)
    gen = torch.Generator().manual_seed(2)
    x, bias = torch.randn(70, 2304, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16()
    alone = torch.cat([int4_bfloat16.linear(x[i:i + 1], q, bias, path=path) for i in range(70)])
    for start, stop in [(0, 70), (5, 6), (3, 19), (1, 33), (10, 42), (69, 70)]:
        assert torch.equal(int4_bfloat16.linear(x[start:stop], q, bias, path=path), alone[start:stop]), (start, stop)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(int4_bfloat16.linear(x, q, bias, path=path), alone)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("path", PATHS)
def test_leading_dimensions_and_no_rows(path):
    q = _matrix(32, 128, 64)
    x = torch.randn(2, 3, 128).bfloat16()
    assert torch.equal(int4_bfloat16.linear(x, q, path=path),
                       int4_bfloat16.linear(x.reshape(6, 128), q, path=path).view(2, 3, 32))
    assert int4_bfloat16.linear(torch.empty(0, 128, dtype=torch.bfloat16), q, path=path).shape == (0, 32)


def test_it_is_the_bfloat16_kernel_of_choice():
    cpu = torch.device("cpu")
    assert four_bit.four_bit_kernel((2048, 2048), 4, 64, torch.bfloat16, cpu) is int4_bfloat16
    assert four_bit.four_bit_kernel((2048, 2048), 4, 48, torch.bfloat16, cpu) is not int4_bfloat16  # not whole tile rows


@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 0, 100, 0, 100, 0)], ids=["ram", "disk"])
def test_the_engine_hands_the_kernel_every_stored_4bit_matrix(tiny_model, tmp_path, percent):
    """In bfloat16 with AVX512-BF16 no 4-bit matrix is dequantised or repacked per step: held in RAM or read
    from disk, each reaches the model as its stored bytes."""
    policy = Policy.from_percents(percent, gpu_batch_size=2, num_gpu_batches=1, compress_weight=True,
                                  compression=CompressionConfig(num_bits=4, group_size=32))
    with Engine(tiny_model, policy, dtype="bfloat16", offload_dir=tmp_path / "o") as engine:
        weights = engine.weights
        in_place = [name for layer in weights.store.layers
                    for name, t in weights.finish(weights.fetch(layer)).items()
                    if isinstance(t, QuantizedTensor) and name not in ROW_LOOKUP_TABLES]
    assert len(in_place) == 2 * 6 + 1  # q, k, v, out, fc1, fc2 of both layers, and the output head
