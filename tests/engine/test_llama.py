"""The Llama family (Llama 2/3, Mistral, Qwen2) through the same engine: greedy output is token-exact
with Hugging Face's own class on the same weights, for every placement; ids are invariant across
policies and resumes; configs outside the family's supported fields are refused naming the field;
the cache, budgets and cost model count only the KV heads."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.errors import ModelConfigError
from engine.model.config import load_config, preset
from engine.model.llama import inverse_frequencies
from engine.model.synthetic import make_model
from engine.model.synthetic_tokenizer import write_tokenizer
from engine.runtime.engine import Engine
from engine.runtime.policy import CompressionConfig, Policy
from engine.runtime.rows import GenerationParams, RowInput
from tests.engine.test_engine_exact import PROMPTS, encode
from tests.support.oracle import hf_greedy, hf_model, model_path

NEW_TOKENS = 10
VOCAB = 1024

# name -> (preset, hidden, heads, what it covers); 2 layers, vocab 1024.
MODELS = {
    "llama3-gqa-tied": ("llama-1b", 256, 8, "Llama 3.2: 8 query heads on 2 KV heads, llama3 RoPE, tied head"),
    "llama3-mqa-untied": ("llama-8b", 128, 4, "Llama 3.1: 4 query heads on 1 KV head, untied head"),
    "llama2-mha-sharded": ("llama2-7b", 128, 4, "Llama 2: every head its own KV, sharded safetensors"),
    "mistral-gqa": ("mistral-7b", 128, 8, "Mistral: 8 heads of 16 on 2 KV heads, rope_theta 1e6"),
    "qwen2-bias-tied": ("qwen2-0.5b", 128, 4, "Qwen2: q/k/v biases, RMSNorm eps 1e-6, tied head"),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """One offline tokenizer (BOS <s>) shared by every test model: training it is the slow part."""
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out, VOCAB, bos_token="<s>")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name, (size, hidden, heads, _) in MODELS.items():
        cfg = replace(preset(size, num_layers=2, hidden_size=hidden, num_heads=heads), vocab_size=VOCAB)
        shard = 150_000 if "sharded" in name else 2**31
        out[name] = make_model(cfg, root / name, with_tokenizer=False, shard_bytes_max=shard)
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, out[name] / f.name)
    return out


def run(model_dir: Path, policy: Policy, prompt_ids, offload: Path, **params):
    with Engine(model_dir, policy, dtype="float32", offload_dir=offload) as engine:
        rows = [RowInput(row_id=i, prompt_ids=ids) for i, ids in enumerate(prompt_ids)]
        results = engine.generate(rows, GenerationParams(max_new_tokens=NEW_TOKENS, **params))
    return engine, results


def assert_matches_hf(model_dir: Path, prompt_ids, results) -> None:
    for ids, res in zip(prompt_ids, results):
        expected = hf_greedy(model_path(model_dir), ids, NEW_TOKENS)
        assert tuple(res.generated_ids) == expected, f"prompt {ids}: engine {res.generated_ids} vs HF {expected}"


def test_models_are_what_they_claim(models):
    """The oracle really is HF's own class per family, the GQA shapes are the ones meant, and the
    sharded checkpoint really is sharded."""
    for name, path in models.items():
        cfg = load_config(path)
        assert type(hf_model(model_path(path))).__name__ == cfg.architecture
        assert (cfg.num_heads, cfg.num_kv_heads) == {"llama3-gqa-tied": (8, 2), "llama3-mqa-untied": (4, 1),
                                                     "llama2-mha-sharded": (4, 4), "mistral-gqa": (8, 2),
                                                     "qwen2-bias-tied": (4, 1)}[name]
    assert len(list(models["llama2-mha-sharded"].glob("model-*-of-*.safetensors"))) > 1
    assert load_config(models["qwen2-bias-tied"]).qkv_bias
    assert not load_config(models["llama3-mqa-untied"]).tie_word_embeddings


PLACEMENTS = {
    "all in RAM": (100, 0, 100, 0, 100, 0),
    "weights on disk": (0, 0, 100, 0, 100, 0),
    "weights split RAM/disk": (20, 30, 100, 0, 100, 0),
    "cache on disk": (100, 0, 0, 0, 100, 0),
    "cache split GPU/CPU/disk": (100, 0, 30, 30, 100, 0),
    "activations on disk": (100, 0, 100, 0, 0, 0),
    "mixed everything": (10, 40, 25, 25, 30, 30),
}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("placement,num_gpu_batches,overlap", [
    ("all in RAM", 1, True), ("weights on disk", 3, True), ("weights split RAM/disk", 2, False),
    ("cache on disk", 3, False), ("cache split GPU/CPU/disk", 2, True), ("activations on disk", 3, True),
    ("mixed everything", 2, False)])
def test_placements_match_hf(models, tmp_path, model, placement, num_gpu_batches, overlap):
    prompt_ids = encode(models[model], PROMPTS)  # 2 to 20 tokens: rows padded differently in a block
    policy = Policy.from_percents(PLACEMENTS[placement], gpu_batch_size=2, num_gpu_batches=num_gpu_batches,
                                  overlap=overlap)
    engine, results = run(models[model], policy, prompt_ids, tmp_path, stop_token_ids=(-1,))
    assert_matches_hf(models[model], prompt_ids, results)
    if PLACEMENTS[placement][0] + PLACEMENTS[placement][1] < 100:
        assert engine.stats.blocks[0].transfers["disk_read"][0] > 0  # the disk tier was really read


def test_several_eos_ids_each_stop_a_row(models, tmp_path):
    """config.json lists two EOS ids (as Llama 3 does): a row stops at whichever comes first, as HF's
    generate does with the same list."""
    src = models["llama3-gqa-tied"]
    model_dir = tmp_path / "eos"
    shutil.copytree(src, model_dir)
    prompt_ids = encode(model_dir, PROMPTS)
    first, second = hf_greedy(model_path(src), prompt_ids[0], NEW_TOKENS)[2], \
        hf_greedy(model_path(src), prompt_ids[1], NEW_TOKENS)[4]
    raw = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**raw, "eos_token_id": [first, second]}))
    assert load_config(model_dir).eos_token_ids == (first, second)
    _, results = run(model_dir, Policy(gpu_batch_size=3, num_gpu_batches=2), prompt_ids, tmp_path / "o")
    hf = hf_model(model_path(src))
    for ids, res in zip(prompt_ids, results):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=[first, second], pad_token_id=1)
        expected = out[0, len(ids):].tolist()
        assert res.generated_ids == expected
        assert res.finish_reason == ("stop" if expected[-1] in (first, second) else "length")
    assert results[0].finish_reason == results[1].finish_reason == "stop"


def test_resume_continues_exactly(models, tmp_path):
    model_dir = models["mistral-gqa"]
    prompt_ids = encode(model_dir, PROMPTS)
    policy = Policy.from_percents((50, 0, 0, 50, 100, 0), gpu_batch_size=2, num_gpu_batches=3)
    steps = []
    params = GenerationParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(-1,))
    with Engine(model_dir, policy, dtype="float32", offload_dir=tmp_path) as engine:
        rows = [RowInput(row_id=i, prompt_ids=ids) for i, ids in enumerate(prompt_ids)]
        partial = engine.generate(rows, params, on_step=lambda u: steps.append(u.step),
                                  should_stop=lambda: len(steps) >= 4)
        assert all(len(r.generated_ids) == 4 for r in partial)
        resumed = engine.generate([RowInput(row_id=r.row_id, prompt_ids=row.prompt_ids,
                                            generated_ids=tuple(r.generated_ids)) for r, row in zip(partial, rows)],
                                  params)
    assert_matches_hf(model_dir, prompt_ids, resumed)


@pytest.mark.parametrize("model", ["llama3-mqa-untied", "qwen2-bias-tied"])
def test_compressed_weights_match_hf_on_dequantised_weights(models, tmp_path, model):
    from tests.engine.test_engine_compression import NEW, hf_on_dequantised_weights
    prompt_ids = encode(models[model], PROMPTS)
    comp = CompressionConfig(num_bits=4, group_size=32)
    policy = Policy.from_percents((0, 30, 100, 0, 100, 0), gpu_batch_size=3, num_gpu_batches=2,
                                  compress_weight=True, compression=comp)
    with Engine(models[model], policy, dtype="float32", offload_dir=tmp_path) as engine:
        results = engine.generate([RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompt_ids)],
                                  GenerationParams(max_new_tokens=NEW, stop_token_ids=(-1,)))
    assert [r.generated_ids for r in results] == hf_on_dequantised_weights(models[model], prompt_ids, comp)


def test_compressed_cache_same_tokens_on_every_tier(models, tmp_path):
    prompt_ids = encode(models["llama3-gqa-tied"], PROMPTS)
    outputs = {}
    for name, percent in {"ram": (100, 0, 100, 0, 100, 0), "disk": (100, 0, 0, 0, 100, 0),
                          "mixed": (100, 0, 30, 30, 50, 0)}.items():
        policy = Policy.from_percents(percent, gpu_batch_size=2, num_gpu_batches=3, compress_cache=True,
                                      compression=CompressionConfig(group_size=16))
        _, results = run(models["llama3-gqa-tied"], policy, prompt_ids, tmp_path / name, stop_token_ids=(-1,))
        outputs[name] = [r.generated_ids for r in results]
    assert outputs["ram"] == outputs["disk"] == outputs["mixed"]


def test_llama3_rope_frequencies_are_hf_s():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = preset("llama-8b")
    hf_cfg = HFLlamaConfig(**cfg.to_hf_dict())
    expected, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    assert scale == 1.0 and torch.equal(inverse_frequencies(cfg), expected)
    assert not torch.equal(inverse_frequencies(replace(cfg, rope_scaling=None)), expected)
