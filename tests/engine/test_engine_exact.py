"""Greedy output is token-exact with HF OPTForCausalLM on the same weights, for every placement."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.runtime.engine import Engine
from engine.model.config import preset
from engine.model.synthetic import make_model
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput
from tests.support.oracle import hf_greedy, model_path

PROMPTS = ["def fibonacci(n):", "import os", "class Queue(object):\n    def __init__(self, size):",
           "x", "# Read the configuration file and return", "for i in range(10): print(i)"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_125m(tmp_path_factory) -> Path:
    """opt-125m's real dims (hidden 768, 12 heads, vocab 50272) with 2 decoder layers."""
    return make_model(preset("125m", num_layers=2), tmp_path_factory.mktemp("m") / "opt-125m-2l")


@pytest.fixture(scope="module")
def model_350m(tmp_path_factory) -> Path:
    """opt-350m's structure: post-LayerNorm, project_in/out (512 <-> 1024), no final LayerNorm."""
    return make_model(preset("350m", num_layers=2), tmp_path_factory.mktemp("m") / "opt-350m-2l")


def encode(model_dir: Path, prompts: list[str]) -> list[tuple[int, ...]]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tuple(tok(p).input_ids) for p in prompts]


def run_engine(model_dir: Path, policy: Policy, prompt_ids, tmp_path: Path, **params):
    with Engine(model_dir, policy, dtype="float32", offload_dir=tmp_path / "offload") as engine:
        rows = [RowInput(row_id=i, prompt_ids=ids) for i, ids in enumerate(prompt_ids)]
        return engine, engine.generate(rows, GenerationParams(max_new_tokens=NEW_TOKENS, **params))


def assert_matches_hf(model_dir, prompt_ids, results, eos=None):
    for ids, res in zip(prompt_ids, results):
        expected = hf_greedy(model_path(model_dir), ids, NEW_TOKENS, eos)
        assert tuple(res.generated_ids) == expected, f"prompt {ids}: engine {res.generated_ids} vs HF {expected}"


PLACEMENTS = {
    "all in RAM": dict(percent=(100, 0, 100, 0, 100, 0)),
    "weights on CPU tier": dict(percent=(0, 100, 0, 100, 0, 100)),
    "all weights on disk": dict(percent=(0, 0, 100, 0, 100, 0)),
    "weights split RAM/disk": dict(percent=(20, 30, 100, 0, 100, 0)),
    "KV cache on disk": dict(percent=(100, 0, 0, 0, 100, 0)),
    "activations on disk": dict(percent=(100, 0, 100, 0, 0, 0)),
    "cache split GPU/CPU/disk": dict(percent=(100, 0, 30, 30, 100, 0)),
    "everything on disk": dict(percent=(0, 0, 0, 0, 0, 0)),
    "mixed everything": dict(percent=(10, 40, 25, 25, 30, 30)),
}


@pytest.mark.parametrize("name", list(PLACEMENTS))
@pytest.mark.parametrize("num_gpu_batches,overlap", [(1, True), (4, True), (4, False)])
def test_placements_match_hf(tiny_model, tmp_path, name, num_gpu_batches, overlap):
    prompt_ids = encode(tiny_model, PROMPTS)
    policy = Policy.from_percents(PLACEMENTS[name]["percent"], gpu_batch_size=2,
                                  num_gpu_batches=num_gpu_batches, overlap=overlap)
    _, results = run_engine(tiny_model, policy, prompt_ids, tmp_path)
    assert_matches_hf(tiny_model, prompt_ids, results)
    assert all(r.finish_reason == "length" for r in results)


# 3 rows x 12 heads = 36 (row, head) pairs per cache slot: 50 % and 30/30/40 split rows mid-way.
@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 30, 0, 50, 0, 0), (100, 0, 30, 30, 100, 0)])
def test_real_dims_125m_match_hf(model_125m, tmp_path, percent):
    prompt_ids = encode(model_125m, PROMPTS)
    policy = Policy.from_percents(percent, gpu_batch_size=3, num_gpu_batches=2)
    engine, results = run_engine(model_125m, policy, prompt_ids, tmp_path)
    assert_matches_hf(model_125m, prompt_ids, results)
    if percent[0] + percent[1] < 100:
        assert engine.stats.blocks[0].transfers["disk_read"][0] > 0  # the disk tier was really read


def test_opt_350m_structure_matches_hf(model_350m, tmp_path):
    prompt_ids = encode(model_350m, PROMPTS)
    policy = Policy.from_percents((50, 0, 50, 0, 50, 0), gpu_batch_size=4, num_gpu_batches=2)
    _, results = run_engine(model_350m, policy, prompt_ids, tmp_path)
    assert_matches_hf(model_350m, prompt_ids, results)


def test_eos_stops_each_row(tiny_model, tmp_path):
    """Use a token HF emits mid-sequence as the stop token: rows stop at different steps, like HF."""
    prompt_ids = encode(tiny_model, PROMPTS)
    reference = hf_greedy(model_path(tiny_model), prompt_ids[0], NEW_TOKENS)
    stop = reference[3]
    _, results = run_engine(tiny_model, Policy(gpu_batch_size=3, num_gpu_batches=2), prompt_ids, tmp_path,
                            stop_token_ids=(stop,))
    assert_matches_hf(tiny_model, prompt_ids, results, eos=stop)
    first = results[0]
    assert first.finish_reason == "stop" and first.generated_ids[-1] == stop and len(first.generated_ids) <= 4
    assert any(r.finish_reason == "length" for r in results)


def test_resume_continues_exactly(tiny_model, tmp_path):
    """Stop at a step boundary, then resume with the generated ids: same output as uninterrupted."""
    prompt_ids = encode(tiny_model, PROMPTS)
    policy = Policy.from_percents((50, 0, 0, 50, 100, 0), gpu_batch_size=2, num_gpu_batches=3)
    steps = []
    with Engine(tiny_model, policy, dtype="float32", offload_dir=tmp_path / "o") as engine:
        rows = [RowInput(row_id=i, prompt_ids=ids) for i, ids in enumerate(prompt_ids)]
        params = GenerationParams(max_new_tokens=NEW_TOKENS)
        partial = engine.generate(rows, params, on_step=lambda u: steps.append(u.step),
                                  should_stop=lambda: len(steps) >= 4)
        assert all(r.finish_reason is None and len(r.generated_ids) == 4 for r in partial)
        resumed = engine.generate([RowInput(row_id=r.row_id, prompt_ids=row.prompt_ids,
                                            generated_ids=tuple(r.generated_ids))
                                   for r, row in zip(partial, rows)], params)
    assert_matches_hf(tiny_model, prompt_ids, resumed)


def test_sampling_depends_only_on_seed_row_and_position(tiny_model, tmp_path):
    prompt_ids = encode(tiny_model, PROMPTS + ["while True:", "print('hello')"])
    params = dict(temperature=0.9, top_p=0.9, seed=1234)
    target = RowInput(row_id=77, prompt_ids=prompt_ids[2])
    with Engine(tiny_model, Policy(gpu_batch_size=1), dtype="float32", offload_dir=tmp_path / "a") as engine:
        alone = engine.generate([target], GenerationParams(max_new_tokens=NEW_TOKENS, **params))[0]
    others = [RowInput(row_id=i, prompt_ids=ids) for i, ids in enumerate(prompt_ids) if i != 2][:7]
    batch = others[:5] + [target] + others[5:]  # a batch of 8, target at position 5
    with Engine(tiny_model, Policy(gpu_batch_size=4, num_gpu_batches=2), dtype="float32",
                offload_dir=tmp_path / "b") as engine:
        results = engine.generate(batch, GenerationParams(max_new_tokens=NEW_TOKENS, **params))
    assert results[5].row_id == 77 and results[5].generated_ids == alone.generated_ids
    greedy = hf_greedy(model_path(tiny_model), prompt_ids[2], NEW_TOKENS)
    assert tuple(alone.generated_ids) != greedy  # it really sampled
    with Engine(tiny_model, Policy(gpu_batch_size=1), dtype="float32", offload_dir=tmp_path / "c") as engine:
        other_seed = engine.generate([target], GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0.9,
                                                                top_p=0.9, seed=99))[0]
    assert other_seed.generated_ids != alone.generated_ids


def test_bfloat16_mostly_agrees_with_hf_bfloat16(tiny_model, tmp_path):
    """bf16 rounding differs between kernels, so bf16 is checked for the first token only."""
    prompt_ids = encode(tiny_model, PROMPTS)
    with Engine(tiny_model, Policy(gpu_batch_size=6), dtype="bfloat16", offload_dir=tmp_path / "o") as engine:
        results = engine.generate([RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompt_ids)],
                                  GenerationParams(max_new_tokens=1))
    first = [hf_greedy(model_path(tiny_model), p, 1)[0] for p in prompt_ids]
    agree = sum(r.generated_ids[0] == f for r, f in zip(results, first))
    assert agree >= len(prompt_ids) - 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["all in RAM", "all weights on disk", "cache split GPU/CPU/disk", "mixed everything"])
def test_cuda_placements_match_hf(tiny_model, tmp_path, name):
    prompt_ids = encode(tiny_model, PROMPTS)
    policy = Policy.from_percents(PLACEMENTS[name]["percent"], gpu_batch_size=2, num_gpu_batches=2)
    with Engine(tiny_model, policy, dtype="float32", device="cuda", offload_dir=tmp_path / "o") as engine:
        results = engine.generate([RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompt_ids)],
                                  GenerationParams(max_new_tokens=NEW_TOKENS))
    assert_matches_hf(tiny_model, prompt_ids, results)


@pytest.mark.parametrize("compress", [False, True])
def test_lookup_tables_on_disk_are_read_by_rows(model_125m, tmp_path, compress):
    """Half the weights streamed: the embedding tables sit on disk and each step reads the rows it
    gathers (opt-125m rows are 1536 bytes, 4-bit rows three sections: spans that cross page
    boundaries), never the whole table; the output head is held in RAM; greedy output is still
    HF's (on the dequantised weights when compressed)."""
    from engine.runtime.weight_tiers import ROW_LOOKUP_TABLES
    from engine.runtime.policy import CompressionConfig
    from engine.runtime.tiers import Tier
    from engine.runtime.tiers import align_up
    from tests.engine.test_engine_compression import hf_on_dequantised_weights
    prompt_ids = encode(model_125m, PROMPTS)
    comp = CompressionConfig(num_bits=4, group_size=32)
    policy = Policy.from_percents((0, 50, 0, 100, 0, 100), gpu_batch_size=3, num_gpu_batches=2,
                                  compress_weight=compress, compression=comp)
    engine, results = run_engine(model_125m, policy, prompt_ids, tmp_path)
    if compress:
        oracle = hf_on_dequantised_weights(model_125m, prompt_ids, comp)  # its first tokens
        assert [list(r.generated_ids[:len(o)]) for r, o in zip(results, oracle)] == oracle
    else:
        assert_matches_hf(model_125m, prompt_ids, results)
    tiers, store = engine.weights.tiers, engine.weights.store
    assert all(tiers["embed"][name] == Tier.DISK for name in ROW_LOOKUP_TABLES)
    assert tiers["head"]["lm_head.weight"] == Tier.CPU
    streamed = sum(align_up(e.nbytes) for layer in tiers for e in store.layers[layer]
                   if tiers[layer][e.name] == Tier.DISK and e.name not in ROW_LOOKUP_TABLES)
    assert streamed > 0
    steps = NEW_TOKENS  # the prefill and NEW_TOKENS - 1 decode steps, one block
    read = engine.stats.blocks[0].transfers["disk_read"][0]
    rows = read - steps * streamed
    token_table = next(e for e in store.layers["embed"] if e.name == "embed_tokens.weight").nbytes
    # Every row gathered is at most two pages per section; the whole table is never read.
    max_rows = sum(len(ids) for ids in prompt_ids) + (steps - 1) * len(prompt_ids)
    assert 0 < rows <= 2 * max_rows * 3 * 2 * 4096
    assert rows < token_table
