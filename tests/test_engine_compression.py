"""Compression inside the engine: 4-bit weights equal HF on the dequantised weights (token-exact);
4-bit cache gives the same tokens on every tier; memory and bytes shrink as promised."""
from __future__ import annotations

import pytest
import torch

from engine.compression import dequantize, quantize
from engine.engine import Engine
from engine.policy import CompressionConfig, Policy
from engine.rows import GenerationParams, RowInput
from tests.test_engine_exact import PROMPTS, encode

NEW = 8


def generate(model, policy, prompt_ids, offload):
    with Engine(model, policy, dtype="float32", offload_dir=offload) as engine:
        res = engine.generate([RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(prompt_ids)],
                              GenerationParams(max_new_tokens=NEW))
        return [r.generated_ids for r in res], engine


def hf_on_dequantised_weights(model_dir, prompt_ids, comp: CompressionConfig):
    """The oracle: HF OPT whose matrices are replaced by dequantize(quantize(w)) of their fp16 values."""
    from transformers import OPTForCausalLM
    model = OPTForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name != "lm_head.weight":
                q = quantize(p.data.half(), num_bits=comp.num_bits, group_size=comp.group_size, dim=-1)
                p.data.copy_(dequantize(q, torch.float32))
        out = []
        for ids in prompt_ids:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=-1,
                                 pad_token_id=1)
            out.append(gen[0, len(ids):].tolist())
    return out


@pytest.mark.parametrize("percent", [(100, 0, 100, 0, 100, 0), (0, 30, 100, 0, 100, 0)])
def test_compressed_weights_match_hf_on_dequantised_weights(tiny_model, tmp_path, percent):
    prompt_ids = encode(tiny_model, PROMPTS)
    comp = CompressionConfig(num_bits=4, group_size=32)
    policy = Policy.from_percents(percent, gpu_batch_size=3, num_gpu_batches=2, compress_weight=True,
                                  compression=comp)
    ours, _ = generate(tiny_model, policy, prompt_ids, tmp_path / "o")
    assert ours == hf_on_dequantised_weights(tiny_model, prompt_ids, comp)


def test_compressed_cache_same_tokens_on_every_tier(tiny_model, tmp_path):
    prompt_ids = encode(tiny_model, PROMPTS)
    outputs = {}
    for name, percent in {"ram": (100, 0, 100, 0, 100, 0), "disk": (100, 0, 0, 0, 100, 0),
                          "mixed": (100, 0, 30, 30, 50, 0)}.items():
        policy = Policy.from_percents(percent, gpu_batch_size=2, num_gpu_batches=3, compress_cache=True,
                                      compression=CompressionConfig(group_size=16))
        outputs[name], _ = generate(tiny_model, policy, prompt_ids, tmp_path / name)
    assert outputs["ram"] == outputs["disk"] == outputs["mixed"]
    # The oracle: HF stepping through a DynamicCache whose appended K/V are round-tripped along
    # head_dim after each step (tests/quality_model.py), one unpadded prompt at a time.
    from tests.oracle import hf_model
    from tests.quality_model import greedy
    model = hf_model(str(tiny_model))
    for ids, ours in zip(prompt_ids, outputs["ram"]):
        expected = greedy(model, torch.tensor([ids]), NEW, cache_bits=4, group_size=16)[0].tolist()
        assert ours == expected


def test_compressed_weight_store_is_smaller_and_streams_fewer_bytes(tiny_model, tmp_path):
    prompt_ids = encode(tiny_model, PROMPTS[:2])
    disk = (0, 0, 100, 0, 100, 0)
    _, plain = generate(tiny_model, Policy.from_percents(disk, gpu_batch_size=2), prompt_ids, tmp_path / "o")
    _, comp = generate(tiny_model, Policy.from_percents(disk, gpu_batch_size=2, compress_weight=True),
                       prompt_ids, tmp_path / "o")
    plain_bytes = sum(f.stat().st_size for f in plain.weights.store.root.glob("*.bin"))
    comp_bytes = sum(f.stat().st_size for f in comp.weights.store.root.glob("*.bin"))
    assert plain_bytes / comp_bytes > 3.0, (plain_bytes, comp_bytes)
    assert plain.stats.blocks[0].transfers["disk_read"][0] / comp.stats.blocks[0].transfers["disk_read"][0] > 3.0
