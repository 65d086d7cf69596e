"""A row's generated ids depend only on the model, its prompt, the generation parameters, the dtype
and the compression settings: not on the block shape, the micro-batch split, its place in the block,
its neighbours' lengths, the placement, overlap, CPU attention, or where a run was resumed.

Bit-identical in float32 and bfloat16. The model is a random-weight OPT at default init, whose top-2
logits are often within a few ulps of each other, so one differently-rounded sum changes a token.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.model.config import preset
from engine.model.synthetic import make_model
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput

NEW_TOKENS = 12
PROMPT_LENGTHS = (1, 2, 5, 9, 17, 23, 31, 40, 47, 64, 65, 80)
GREEDY = dict()
SAMPLED = dict(temperature=0.8, top_p=0.9, seed=7)

# (gpu_batch_size, num_gpu_batches, percents, options): block shapes 1x1 .. 32x4; weights, cache and
# activations in RAM, on disk, split; overlap on and off; attention where the cache lives.
POLICIES = {
    "1x1 all in RAM": (1, 1, (100, 0, 100, 0, 100, 0), {}),
    "12x1 all in RAM": (12, 1, (100, 0, 100, 0, 100, 0), {}),
    "4x3 weights on disk": (4, 3, (0, 0, 100, 0, 100, 0), {}),
    "2x2 cache on disk": (2, 2, (100, 0, 0, 0, 100, 0), {}),
    "3x4 cache split, no overlap": (3, 4, (100, 0, 30, 30, 100, 0), dict(overlap=False)),
    "5x2 activations on disk": (5, 2, (100, 0, 100, 0, 0, 0), {}),
    "32x4 mixed everything": (32, 4, (10, 40, 25, 25, 30, 30), {}),
    "6x2 CPU attention, cache RAM/disk": (6, 2, (100, 0, 0, 50, 100, 0), dict(cpu_cache_compute=True)),
    "7x1 everything on disk, no overlap": (7, 1, (0, 0, 0, 0, 0, 0), dict(overlap=False)),
}


def _bf16_is_native() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = ["float32", pytest.param("bfloat16", marks=pytest.mark.slow) if not _bf16_is_native() else "bfloat16"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """opt-125m's dims (hidden 768, 12 heads of 64), 2 layers: wide enough that the BLAS picks
    different kernels by row count, small enough for bfloat16 where the CPU emulates it."""
    return make_model(preset("125m", num_layers=2, hidden_size=768), tmp_path_factory.mktemp("m") / "opt-inv")


@pytest.fixture(scope="module")
def offload(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("offload")


def prompts(vocab: int = 50000) -> list[tuple[int, ...]]:
    rng = random.Random(11)
    return [tuple(rng.randrange(4, vocab) for _ in range(n)) for n in PROMPT_LENGTHS]


def policy(name: str, **extra) -> Policy:
    gbs, ngb, percents, options = POLICIES[name]
    return Policy.from_percents(percents, gpu_batch_size=gbs, num_gpu_batches=ngb, **options, **extra)


def generate(model: Path, offload: Path, pol: Policy, dtype: str, rows: list[RowInput], params: dict,
             order_seed: int = 0) -> dict[int, tuple[int, ...]]:
    """Run the rows in a shuffled order; returns generated ids by row id."""
    shuffled = list(rows)
    random.Random(order_seed).shuffle(shuffled)
    with Engine(model, pol, dtype=dtype, offload_dir=offload) as engine:
        results = engine.generate(shuffled, GenerationParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(-1,),
                                                             **params))
    return {r.row_id: tuple(r.generated_ids) for r in results}


def resumed_rows(rows: list[RowInput], reference: dict[int, tuple[int, ...]]) -> list[RowInput]:
    """Each row resumed after a different number of saved tokens: 0, 1, k and n-1."""
    saved = (0, 1, NEW_TOKENS // 2, NEW_TOKENS - 1)
    return [RowInput(row_id=r.row_id, prompt_ids=r.prompt_ids,
                     generated_ids=reference[r.row_id][:saved[i % len(saved)]]) for i, r in enumerate(rows)]


def assert_same(reference: dict, got: dict, what: str) -> None:
    differ = [row for row in reference if reference[row] != got[row]]
    assert not differ, f"{what}: rows {differ} differ, e.g. {reference[differ[0]]} vs {got[differ[0]]}"


def assert_policies_and_resumes_agree(model: Path, offload: Path, dtype: str, rows: list[RowInput],
                                      params: dict) -> None:
    """Every policy, and three of them resuming each row after a different number of saved tokens,
    give the first policy's ids."""
    names = list(POLICIES)
    reference = generate(model, offload, policy(names[0]), dtype, rows, params)
    for seed, name in enumerate(names[1:], start=1):
        assert_same(reference, generate(model, offload, policy(name), dtype, rows, params, seed), name)
    for name in ("4x3 weights on disk", "3x4 cache split, no overlap", "32x4 mixed everything"):
        got = generate(model, offload, policy(name), dtype, resumed_rows(rows, reference), params, 99)
        assert_same(reference, got, f"resumed under {name}")
    # The test means something only if neighbours could have mattered: the rows really differ.
    assert len({ids for ids in reference.values()}) > len(rows) // 2


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_every_policy_and_resume_point_gives_the_same_ids(model, offload, dtype, params):
    if dtype == "bfloat16" and params is SAMPLED and not _bf16_is_native():
        # Sampling draws from float32 logits with the row's own generator: what it adds is
        # dtype-independent and checked in float32; the greedy case checks the emulated kernels.
        pytest.skip("bfloat16 is emulated on this CPU (no avx512_bf16/amx_bf16): greedy covers its kernels")
    rows = [RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompts())]
    assert_policies_and_resumes_agree(model, offload, dtype, rows, params)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dtype", DTYPES)
def test_compressed_weights_and_cache_are_invariant_among_themselves(model, offload, dtype):
    if dtype == "bfloat16" and not _bf16_is_native():
        # 193 s on a 2-core AVX2 host. Jobs there run in float32 (covered here); the fused 4-bit
        # kernel's row invariance is probed directly in test_compression.
        pytest.skip("bfloat16 is emulated on this CPU (no avx512_bf16/amx_bf16): 4-bit runs in float32 here")
    rows = [RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompts())]
    names = ["1x1 all in RAM", "4x3 weights on disk", "2x2 cache on disk", "32x4 mixed everything",
             "6x2 CPU attention, cache RAM/disk"]
    compressed = dict(compress_weight=True, compress_cache=True)
    reference = generate(model, offload, policy(names[0], **compressed), dtype, rows, GREEDY)
    for seed, name in enumerate(names[1:], start=1):
        assert_same(reference, generate(model, offload, policy(name, **compressed), dtype, rows, GREEDY, seed),
                    f"4-bit, {name}")
    got = generate(model, offload, policy("3x4 cache split, no overlap", **compressed), dtype,
                   resumed_rows(rows, reference), GREEDY, 5)
    assert_same(reference, got, "4-bit, resumed")
    plain = generate(model, offload, policy(names[0]), dtype, rows, GREEDY)
    assert plain != reference  # compression really changed the numbers


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_past_128_positions_are_the_same_alone_beside_longer_rows_and_resumed(model, offload, dtype):
    # Attention over more than 128 keys is where a library's sum over the key axis can be blocked
    # by the call's key count, which the longest row of a block sets (attention.weighted_values).
    rng = random.Random(5)
    lengths = (140, 333, 190, 260, 150, 301)
    rows = [RowInput(row_id=i, prompt_ids=tuple(rng.randrange(4, 50000) for _ in range(n)))
            for i, n in enumerate(lengths)]
    alone = {}
    for row in rows:
        alone |= generate(model, offload, policy("1x1 all in RAM"), dtype, [row], GREEDY)
    assert_same(alone, generate(model, offload, policy("12x1 all in RAM"), dtype, rows, GREEDY), "one block")
    assert_same(alone, generate(model, offload, policy("2x2 cache on disk"), dtype, rows, GREEDY, 3), "2x2")
    got = generate(model, offload, policy("3x4 cache split, no overlap"), dtype, resumed_rows(rows, alone), GREEDY, 4)
    assert_same(alone, got, "resumed")
    assert len(set(alone.values())) > len(rows) // 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_policies_and_resume_give_the_same_ids(model, offload, dtype):
    rows = [RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompts())]
    with_device = dict(device="cuda")
    reference = _generate_cuda(model, offload, policy("1x1 all in RAM"), dtype, rows, with_device)
    for name in ("12x1 all in RAM", "4x3 weights on disk", "3x4 cache split, no overlap", "32x4 mixed everything"):
        assert_same(reference, _generate_cuda(model, offload, policy(name), dtype, rows, with_device), name)
    got = _generate_cuda(model, offload, policy("4x3 weights on disk"), dtype, resumed_rows(rows, reference),
                         with_device)
    assert_same(reference, got, "resumed on CUDA")


def _generate_cuda(model, offload, pol, dtype, rows, engine_kwargs):
    with Engine(model, pol, dtype=dtype, offload_dir=offload, **engine_kwargs) as engine:
        results = engine.generate(rows, GenerationParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(-1,)))
    return {r.row_id: tuple(r.generated_ids) for r in results}
