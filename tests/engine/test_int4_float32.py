"""The native 4-bit kernel for float32 activations (engine.model.int4_float32): it multiplies exactly
the weights compression.dequantize gives, agrees with a float64 product, gives a row the same bits
in every call, and the engine hands it the stored bytes of every 4-bit matrix, held or streamed."""
from __future__ import annotations

import pytest
import torch

from engine.model import int4_float32
from engine.runtime.compression import QuantizedTensor, dequantize, quantize
from engine.runtime.engine import Engine
from engine.runtime.policy import CompressionConfig, Policy
from engine.runtime.weight_tiers import ROW_LOOKUP_TABLES

pytestmark = pytest.mark.skipif(not int4_float32.available(),
                                reason="no C compiler, or a CPU without AVX2, FMA and F16C")


def _matrix(n: int, k: int, group: int, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    return quantize((torch.randn(n, k, generator=gen) * 0.05).half(), num_bits=4, group_size=group, dim=-1)


@pytest.mark.parametrize("n, k, group", [(64, 256, 64), (8, 1024, 32), (12, 1536, 512), (36, 96, 16)])
def test_the_kernel_multiplies_exactly_the_dequantised_weights(n, k, group):
    """x = the identity: each output is one weight times 1 plus exact zeros."""
    q = _matrix(n, k, group)
    got = int4_float32.linear(torch.eye(k), q)
    assert torch.equal(got, dequantize(q, torch.float32).t())


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 32])
def test_the_kernel_agrees_with_a_float64_product(rows):
    q = _matrix(128, 2048, 64, seed=rows)
    gen = torch.Generator().manual_seed(1)
    x, bias = torch.randn(rows, 2048, generator=gen), torch.randn(128, generator=gen)
    expected = x.double() @ dequantize(q, torch.float32).double().t() + bias.double()
    got = int4_float32.linear(x, q, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, 128)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_a_row_has_the_same_bits_in_every_call():
    """Alone, at any place among 1..40 rows, on one thread or two: the same bits."""
    q = _matrix(96, 1024, 64)
    gen = torch.Generator().manual_seed(2)
    x, bias = torch.randn(40, 1024, generator=gen), torch.randn(96, generator=gen)
    alone = torch.cat([int4_float32.linear(x[i:i + 1], q, bias) for i in range(40)])
    for start, stop in [(0, 40), (5, 6), (3, 8), (1, 33), (10, 14), (39, 40)]:
        assert torch.equal(int4_float32.linear(x[start:stop], q, bias), alone[start:stop]), (start, stop)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(int4_float32.linear(x, q, bias), alone)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(alone, x @ dequantize(q, torch.float32).t() + bias)  # its own low bits, not the library's


def test_leading_dimensions_and_no_rows():
    q = _matrix(16, 128, 64)
    x = torch.randn(2, 3, 128)
    assert torch.equal(int4_float32.linear(x, q), int4_float32.linear(x.reshape(6, 128), q).view(2, 3, 16))
    assert int4_float32.linear(torch.empty(0, 128), q).shape == (0, 16)


@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 0, 100, 0, 100, 0)], ids=["ram", "disk"])
def test_the_engine_hands_the_kernel_every_stored_4bit_matrix(tiny_model, tmp_path, percent):
    """In float32 no 4-bit matrix is dequantised per step: held in RAM or read from disk, each
    reaches the model as its stored bytes (views of the read buffer), and the run's tokens are HF's
    on the dequantised weights (test_engine_compression)."""
    policy = Policy.from_percents(percent, gpu_batch_size=2, num_gpu_batches=1, compress_weight=True,
                                  compression=CompressionConfig(num_bits=4, group_size=32))
    with Engine(tiny_model, policy, dtype="float32", offload_dir=tmp_path / "o") as engine:
        weights = engine.weights
        in_place = [name for layer in weights.store.layers
                    for name, t in weights.finish(weights.fetch(layer)).items()
                    if isinstance(t, QuantizedTensor) and name not in ROW_LOOKUP_TABLES]
    assert len(in_place) == 2 * 6 + 1  # q, k, v, out, fc1, fc2 of both layers, and the output head


@pytest.mark.parametrize("n, k, group", [(64, 256, 64), (12, 1536, 512), (36, 96, 16)])
def test_its_dequantised_copy_is_compression_dequantize_s(n, k, group):
    """Prompt tokens multiply this copy: bit for bit what compression.dequantize gives."""
    q = _matrix(n, k, group, seed=3)
    assert torch.equal(int4_float32.dequantize(q), dequantize(q, torch.float32))
