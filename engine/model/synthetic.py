"""`flexjob make-model`: a random-weight OPT of any published size, as a normal HF model directory.

Weights are seeded and written shard by shard (a few layers at a time), so sizes larger than RAM
never sit whole in memory. Initialisation is normal, like OPT's, with changes that make greedy comparisons meaningful: the
decoder's matrices are scaled by fan-in so attention and MLP both shape the output (a bug in the
KV cache changes the tokens), LayerNorm gains and biases are perturbed (so those code paths are
exercised), and the final LayerNorm gain is raised so top-1 logit margins sit far above float noise.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from engine.model.config import ModelConfig, hf_tensor_shapes
from engine.model.llama_config import LlamaConfig
from engine.model.synthetic_tokenizer import write_tokenizer

SHARD_BYTES = 2 * 1024**3
FINAL_LN_GAIN = 6.0


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(".weight") and len(shape) == 2 and "layers." in name:
        # Scaled by fan-in so every layer matters: peaked attention (q.k ~ 2 std) and attention
        # and MLP outputs of unit scale; with OPT's flat 0.02 the residual stream ignores attention.
        gain = 1.5 if ("q_proj" in name or "k_proj" in name) else 1.0
        return gain / shape[1] ** 0.5 * torch.randn(shape, generator=gen)
    if name.startswith("model.layers.") and name.endswith("_proj.bias"):
        return 0.5 * torch.randn(shape, generator=gen)  # Qwen2's q/k/v biases: large enough to matter
    if name.endswith(("layer_norm.weight", "layernorm.weight")) or name == "model.norm.weight":
        gain = FINAL_LN_GAIN if name in ("model.decoder.final_layer_norm.weight", "model.norm.weight") else 1.0
        return gain * (1.0 + 0.1 * torch.randn(shape, generator=gen))
    if name.endswith("layer_norm.bias"):
        return 0.05 * torch.randn(shape, generator=gen)
    return 0.02 * torch.randn(shape, generator=gen)


def make_model(cfg: ModelConfig, out_dir: str | Path, *, seed: int = 0, with_tokenizer: bool = True,
               on_tensor: Callable[[str, int, int], None] | None = None, shard_bytes_max: int = SHARD_BYTES) -> Path:
    """Write config.json, safetensors shards (+ index) and a tokenizer into `out_dir`. A Llama-family
    model takes the offline tokenizer's ids: BOS <s> = 0, <pad> = 1, EOS </s> = 2."""
    from safetensors.torch import save_file

    if isinstance(cfg, LlamaConfig):
        cfg = replace(cfg, bos_token_id=0, pad_token_id=1, eos_token_ids=(2,))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    specs = list(hf_tensor_shapes(cfg))
    total_bytes = sum(2 * _numel(s) for _, s in specs)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes, done = 0, 0
    weight_map, shard_names = {}, []

    def flush() -> None:
        index = len(shard_names)
        name = f"model-{index + 1:05d}.safetensors"
        save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
        shard_names.append(name)
        weight_map.update({k: name for k in shards[-1]})
        shards[-1] = {}

    for tensor_name, shape in specs:
        tensor = _random_tensor(tensor_name, shape, gen).to(torch.float16)
        nbytes = tensor.numel() * 2
        if shard_bytes and shard_bytes + nbytes > shard_bytes_max:
            flush()
            shard_bytes = 0
        shards[-1][tensor_name] = tensor
        shard_bytes += nbytes
        done += nbytes
        if on_tensor:
            on_tensor(tensor_name, done, total_bytes)
    flush()
    _name_shards(out_dir, shard_names, weight_map, total_bytes)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.to_hf_dict()["eos_token_id"],
         "pad_token_id": cfg.pad_token_id}, indent=2))
    if with_tokenizer:
        write_tokenizer(out_dir, cfg.vocab_size, bos_token="<s>" if isinstance(cfg, LlamaConfig) else "</s>")
    return out_dir


def _name_shards(out_dir: Path, shard_names: list[str], weight_map: dict[str, str], total_bytes: int) -> None:
    """HF's names for the written shards: one file, or "-of-" names (the count is known now) plus
    the index that maps every tensor to its shard."""
    if len(shard_names) == 1:
        (out_dir / shard_names[0]).rename(out_dir / "model.safetensors")
        return
    n = len(shard_names)
    renamed = {old: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, old in enumerate(shard_names)}
    for old, new in renamed.items():
        (out_dir / old).rename(out_dir / new)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
