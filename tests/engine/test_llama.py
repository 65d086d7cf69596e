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
from tests.engine.test_engine_exact import PLACEMENTS as OPT_PLACEMENTS
from tests.engine.test_engine_exact import PROMPTS, encode
from tests.engine.test_invariance import _bf16_is_native
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


PLACEMENTS = {name: spec["percent"] for name, spec in OPT_PLACEMENTS.items()}  # OPT's placement matrix


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("placement,num_gpu_batches,overlap", [
    ("all in RAM", 1, True), ("all weights on disk", 3, True), ("weights split RAM/disk", 2, False),
    ("KV cache on disk", 3, False), ("cache split GPU/CPU/disk", 2, True), ("activations on disk", 3, True),
    ("mixed everything", 2, False), ("everything on disk", 4, True)])
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
    # The oracle: HF's generate with a cache of the KV heads (keys rotated, as the engine caches them)
    # that round-trips every K/V it is given along head_dim before attention sees it: a compressed
    # cache is attended as stored, the newest positions included, in the prefill too.
    from transformers import DynamicCache

    from engine.runtime.compression import dequantize, quantize

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        return dequantize(quantize(x, num_bits=4, group_size=16), x.dtype)

    class RoundTripCache(DynamicCache):
        def update(self, keys, values, layer_idx, *args, **kwargs):
            return super().update(round_trip(keys), round_trip(values), layer_idx, *args, **kwargs)

    model = hf_model(model_path(models["llama3-gqa-tied"]))
    for ids, ours in zip(prompt_ids, outputs["ram"]):
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1,
                                 pad_token_id=1, cache=RoundTripCache())
        assert ours == out[0, len(ids):].tolist()


def test_llama3_rope_frequencies_are_hf_s():
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = preset("llama-8b")
    hf_cfg = HFLlamaConfig(**cfg.to_hf_dict())
    expected, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    assert scale == 1.0 and torch.equal(inverse_frequencies(cfg), expected)
    assert not torch.equal(inverse_frequencies(replace(cfg, rope_scaling=None)), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,params", [
    ("float32", {}), ("float32", dict(temperature=0.8, top_p=0.9, seed=7)),
    pytest.param("bfloat16", {}, marks=[] if _bf16_is_native() else [pytest.mark.slow])],
    ids=["float32-greedy", "float32-sampled", "bfloat16-greedy"])
def test_every_policy_and_resume_point_gives_the_same_ids(models, tmp_path, dtype, params):
    """test_invariance's policies (block shapes 1x1 .. 32x4, every placement, overlap on/off, CPU
    attention) and resume points, on grouped-query attention: each pair's stacked query heads."""
    from tests.engine.test_invariance import assert_policies_and_resumes_agree, prompts
    rows = [RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompts(VOCAB))]
    assert_policies_and_resumes_agree(models["llama3-gqa-tied"], tmp_path, dtype, rows, params)


def test_cache_budgets_and_cost_model_count_kv_heads_only(models, tmp_path):
    """A KV head is cached once for its whole group: the engine's budget, the cost model's cache
    bytes and the planner's peak all shrink by heads / KV heads against the same model with MHA."""
    from engine.planning.cost_inputs import Shape, sizes
    from engine.planning.cost_model import estimate
    from engine.planning.hardware import t4_flexgen
    from engine.runtime.budgets import estimate_memory
    gqa = load_config(models["llama3-gqa-tied"])  # 8 heads, 2 KV heads, head_dim 32
    policy = Policy.from_percents((100, 0, 100, 0, 100, 0), gpu_batch_size=4, num_gpu_batches=2)
    with Engine(models["llama3-gqa-tied"], policy, dtype="float32", offload_dir=tmp_path) as engine:
        est = estimate_memory(gqa, engine.weights.store, policy, torch.device("cpu"), torch.float32,
                              prompt_len=20, gen_len=11)
    held = 64  # 20 + 10 positions, rounded up to KEY_ALIGN: attention's aligned layout in memory
    assert est.cpu["kv cache"] == gqa.num_layers * 2 * held * 2 * 4 * gqa.num_kv_heads * gqa.head_dim * 4
    big = preset("llama-8b")  # 32 heads, 8 KV heads
    mha = replace(big, num_kv_heads=big.num_heads)
    hw, sh = t4_flexgen(), Shape(gpu_batch_size=8, num_gpu_batches=4, prompt_len=512, gen_len=32)
    assert sizes(big, sh, hw).kv_total * 4 == sizes(mha, sh, hw).kv_total
    on_gpu = Policy.from_percents((0, 100, 100, 0, 100, 0), gpu_batch_size=8, num_gpu_batches=4)
    gqa_gib, mha_gib = (estimate(c, hw, on_gpu, prompt_len=512, gen_len=32).peak_gib["gpu"] for c in (big, mha))
    cache_gib = sizes(mha, sh, hw).kv_total * 3 / 4 / 2**30  # what the KV heads save
    assert gqa_gib < mha_gib - 0.9 * cache_gib


@pytest.mark.parametrize("change,field", [
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "max_window_layers": 1},
     "use_sliding_window"),
    ({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}, "architectures"),
])
def test_unsupported_configs_are_refused_naming_the_field(models, tmp_path, change, field):
    raw = json.loads((models["llama3-mqa-untied"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(ModelConfigError) as err:
        load_config(tmp_path)
    assert field in str(err.value) and "\n" not in str(err.value)


def test_config_fields_are_read(models, tmp_path):
    """transformers' rope_parameters form, Mistral's sliding window (sequences kept within it, so it
    never applies), attention_bias on Llama (o_proj too), no pad id (the first EOS pads)."""
    raw = json.loads((models["llama3-mqa-untied"] / "config.json").read_text())
    scaling = raw.pop("rope_scaling")
    theta = raw.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(
        {**raw, "rope_parameters": {**scaling, "rope_theta": theta}, "attention_bias": True, "pad_token_id": None,
         "eos_token_id": [5, 6]}))
    cfg = load_config(tmp_path)
    assert cfg.rope_scaling == load_config(models["llama3-mqa-untied"]).rope_scaling and cfg.rope_theta == theta
    assert cfg.qkv_bias and cfg.o_bias and cfg.pad_token_id == 5 and cfg.eos_token_ids == (5, 6)
    mistral = json.loads((models["mistral-gqa"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**mistral, "sliding_window": 4096}))
    assert load_config(tmp_path).max_positions == 4096


def test_published_sizes():
    """Parameter counts of the published checkpoints (their model cards)."""
    counts = {"llama-1b": 1.236e9, "llama-3b": 3.213e9, "llama-8b": 8.030e9, "llama-70b": 70.554e9,
              "llama2-7b": 6.738e9, "mistral-7b": 7.248e9, "qwen2-0.5b": 0.494e9, "qwen2-7b": 7.616e9}
    for name, count in counts.items():
        assert preset(name).param_count() == pytest.approx(count, rel=1e-3), name


@pytest.mark.slow  # trains a 50k-token tokenizer
def test_make_model_cli_writes_a_model_hf_and_the_engine_load(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoTokenizer
    from jobrunner.cli.main import main
    out = tmp_path / "llama"
    result = CliRunner().invoke(main, ["make-model", "llama-1b", "--layers", "2", "--hidden", "128", "-o", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("LlamaForCausalLM", 2, 128, 1)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tuple(tok("def f(x):").input_ids)
    assert ids[0] == cfg.bos_token_id == tok.bos_token_id and tok.eos_token_id in cfg.eos_token_ids
    _, results = run(out, Policy(gpu_batch_size=1), [ids], tmp_path / "o", stop_token_ids=(-1,))
    assert results[0].generated_ids == list(hf_greedy(model_path(out), ids, NEW_TOKENS))


def test_head_dim_apart_from_hidden_matches_hf(tmp_path, tokenizer_dir):
    """config.json's head_dim where heads x head_dim != hidden (as in Mistral NeMo): 4 heads of 48
    over hidden 128, on 2 KV heads."""
    cfg = replace(preset("mistral-7b", num_layers=2, hidden_size=128, num_heads=4), head_dim_override=48,
                  vocab_size=VOCAB)
    model_dir = make_model(cfg, tmp_path / "hd48", with_tokenizer=False)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    assert load_config(model_dir).head_dim == 48
    prompt_ids = encode(model_dir, PROMPTS)
    for percent in ((100, 0, 100, 0, 100, 0), (0, 50, 0, 50, 0, 50)):
        policy = Policy.from_percents(percent, gpu_batch_size=2, num_gpu_batches=2)
        _, results = run(model_dir, policy, prompt_ids, tmp_path / "o", stop_token_ids=(-1,))
        assert_matches_hf(model_dir, prompt_ids, results)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("model", ["llama3-gqa-tied", "qwen2-bias-tied"])
@pytest.mark.parametrize("placement", ["all in RAM", "all weights on disk", "cache split GPU/CPU/disk",
                                       "mixed everything"])
def test_cuda_placements_match_hf(models, tmp_path, model, placement):
    prompt_ids = encode(models[model], PROMPTS)
    policy = Policy.from_percents(PLACEMENTS[placement], gpu_batch_size=2, num_gpu_batches=2)
    with Engine(models[model], policy, dtype="float32", device="cuda", offload_dir=tmp_path) as engine:
        results = engine.generate([RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompt_ids)],
                                  GenerationParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(-1,)))
    assert_matches_hf(models[model], prompt_ids, results)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_rope_rows_do_not_depend_on_neighbours(dtype):
    """The family's own reductions besides `linear` and `attend`: a row's RMSNorm is bit-identical
    alone and among 300 rows, at the hidden sizes of the published models (up to llama-70b's 8192);
    so are a row's rotated q and k, alone and in a block of 40 rows at other positions."""
    from engine.model.config import layer_tensor_shapes
    from engine.model.llama import qkv, rms_norm
    gen = torch.Generator().manual_seed(0)
    for hidden in (256, 2048, 4096, 8192):
        x, w = torch.randn(300, 3, hidden, generator=gen).to(dtype), torch.randn(hidden, generator=gen).to(dtype)
        together = rms_norm(x, w, 1e-5)
        for b, s in ((0, 0), (7, 2), (299, 1)):
            assert torch.equal(rms_norm(x[b:b + 1, s:s + 1], w, 1e-5)[0, 0], together[b, s])
    cfg = preset("llama-1b", num_layers=1, hidden_size=256, num_heads=8)
    weights = {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in layer_tensor_shapes(cfg)}
    h = torch.randn(40, 5, 256, generator=gen).to(dtype)
    positions = torch.arange(5).repeat(40, 1) + torch.arange(40)[:, None]
    q, k, _ = qkv(weights, cfg, h, positions)
    q1, k1, _ = qkv(weights, cfg, h[13:14, 4:5], positions[13:14, 4:5])
    assert torch.equal(q1[0, 0], q[13, 4]) and torch.equal(k1[0, 0], k[13, 4])


def test_a_job_on_a_qwen2_model_equals_the_engine_called_directly(models, tmp_path, offload_dir, prompts_file,
                                                                   run_worker):
    """enqueue -> worker -> results on a Llama-family directory: the job's completions are the
    engine's own."""
    import pyarrow.parquet as pq

    from jobrunner.io.enqueue import JobParams, enqueue
    from jobrunner.io.results import write_results
    from jobrunner.store.db import open_store
    from tests.jobrunner.test_worker import engine_reference
    from tests.support.jobs import SAMPLE_PROMPTS
    db = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    job = enqueue(db, prompts_file, model_dir=models["qwen2-bias-tied"], id_column="id", shard_rows=5,
                  params=JobParams(max_new_tokens=6)).job
    assert run_worker(db, block=4).rows_done == len(SAMPLE_PROMPTS)
    table = pq.read_table(write_results(db, job.id, tmp_path / "out.parquet").path)
    got = list(zip(table.column("completion").to_pylist(), table.column("completion_tokens").to_pylist(),
                   table.column("finish_reason").to_pylist()))
    assert got == engine_reference(models["qwen2-bias-tied"], offload_dir, SAMPLE_PROMPTS,
                                   GenerationParams(max_new_tokens=6))
