"""Matrices held in RAM are packed once into the CPU math library's layout, and that changes no bit:
a packed weight gives every row, at every call size, what the plain weight gives (the plain call is
the oracle for bits, F.linear for values), and the engine holds a decoder layer's RAM-resident
matrices packed and streamed ones, and the head's, plain; float32 ones stay plain where prompt
tokens go to MKL, which reads only the plain layout (engine.model.kernels.library_linear)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model import packed_weight
from engine.model.config import preset
from engine.model.kernels import linear, pack_for_cpu, prefill_library_differs
from engine.model.packed_weight import PackedWeight
from engine.model.synthetic import make_model
from engine.runtime.devices import cpu_has_fast_bfloat16
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy

DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_has_fast_bfloat16(), reason="bfloat16 is emulated on this CPU: its kernels are not the ones packed"))]
needs_packing = pytest.mark.skipif(not packed_weight.packable(torch.zeros(2, 2)),
                                   reason="this torch build has no oneDNN weight reorder")


@needs_packing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(96, 64), (512, 256), (256, 1024)])
def test_a_packed_weight_gives_every_row_the_plain_weights_bits(dtype, shape):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen).to(dtype)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    rows = torch.randn(300, shape[1], generator=gen).to(dtype)
    packed = packed_weight.pack(weight)  # generated tokens' library reads it (prompt ones too in bf16)
    assert packed.shape == weight.shape
    for m in (1, 3, 8, 32, 128, 300):
        got = linear(rows[:m], packed, bias)
        assert torch.equal(got, linear(rows[:m], weight, bias)), f"{m} rows"
        torch.testing.assert_close(got.float(), F.linear(rows[:m].float(), weight.float(), bias.float()),
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=0.5 if dtype == torch.bfloat16 else 1e-3)


@needs_packing
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_engine_packs_the_matrices_it_holds_in_ram_and_streams_the_others_plain(tmp_path, dtype):
    model = make_model(preset("125m", num_layers=2, hidden_size=256), tmp_path / "opt")
    matrix = PackedWeight if not prefill_library_differs(torch.zeros(1, 1, dtype=dtype), dtype,
                                                         torch.device("cpu")) else torch.Tensor

    def held(percents) -> dict[str, type]:
        policy = Policy.from_percents(percents, gpu_batch_size=2, num_gpu_batches=1)
        name = str(dtype).removeprefix("torch.")
        with Engine(model, policy, dtype=name, offload_dir=tmp_path / "offload") as engine:
            weights = engine.weights
            kinds = {name: type(weights.finish(weights.fetch("decoder.0"))[name])
                     for name in ("self_attn.q_proj.weight", "fc1.weight", "fc1.bias")}
            return kinds | {"lm_head.weight": type(weights.finish(weights.fetch("head"))["lm_head.weight"])}

    # The head runs once a step and stays plain (its packed copy would double it while it is made).
    assert held([0, 100, 0, 100, 0, 100]) == {"self_attn.q_proj.weight": matrix, "fc1.weight": matrix,
                                              "fc1.bias": torch.Tensor, "lm_head.weight": torch.Tensor}
    on_disk = held([0, 0, 0, 100, 0, 100])
    assert on_disk["self_attn.q_proj.weight"] is torch.Tensor and on_disk["fc1.weight"] is torch.Tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_dtype_gets_a_held_weight_that_multiplies_like_the_plain_one(dtype):
    """On every CPU, in every dtype the engine runs (bfloat16 too where it is emulated and oneDNN
    cannot reorder it), holding a matrix gives a weight that multiplies bit for bit like the plain
    one: packed where the library can and every token's library reads it, the plain tensor elsewhere."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(128, 64, generator=gen).to(dtype)
    rows = torch.randn(40, 64, generator=gen).to(dtype)
    held = pack_for_cpu(weight)
    cpu = torch.device("cpu")
    assert isinstance(held, PackedWeight) == (packed_weight.packable(weight)
                                              and not prefill_library_differs(weight, dtype, cpu))
    for prompt in (True, False):
        assert torch.equal(linear(rows, held, prompt=prompt), linear(rows, weight, prompt=prompt))
