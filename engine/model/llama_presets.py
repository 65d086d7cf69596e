"""Published Llama-family sizes (the dims of their Hugging Face config.json files), so that
`flexjob make-model` and the planner work on real shapes, optionally shrunk for tests."""
from __future__ import annotations

from dataclasses import replace

from engine.errors import ModelConfigError
from engine.model.llama_config import Llama3Scaling, LlamaConfig
from engine.model.shrink import heads_for_hidden

LLAMA31_ROPE = dict(rope_theta=500000.0, max_positions=131072)
_LLAMA3_VOCAB = dict(vocab_size=128256, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
                     pad_token_id=128004)


def _llama3(name: str, hidden: int, layers: int, heads: int, ffn: int, *, factor: float, tied: bool,
            kv: int = 8) -> LlamaConfig:
    scaling = Llama3Scaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_positions=8192)
    return LlamaConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       ffn_dim=ffn, rope_scaling=scaling, tie_word_embeddings=tied, **LLAMA31_ROPE,
                       **_LLAMA3_VOCAB)


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-1b": _llama3("llama-1b", 2048, 16, 32, 8192, factor=32.0, tied=True),   # Llama 3.2 1B
    "llama-3b": _llama3("llama-3b", 3072, 28, 24, 8192, factor=32.0, tied=True),   # Llama 3.2 3B
    "llama-8b": _llama3("llama-8b", 4096, 32, 32, 14336, factor=8.0, tied=False),  # Llama 3.1 8B
    "llama-70b": _llama3("llama-70b", 8192, 80, 64, 28672, factor=8.0, tied=False),  # Llama 3.1 70B
    "llama2-7b": LlamaConfig(name="llama2-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                             ffn_dim=11008, vocab_size=32000, max_positions=4096),
    "mistral-7b": LlamaConfig(name="mistral-7b", architecture="MistralForCausalLM", hidden_size=4096,
                              num_layers=32, num_heads=32, num_kv_heads=8, ffn_dim=14336, vocab_size=32768,
                              max_positions=32768, rope_theta=1e6),  # v0.3
    "qwen2-0.5b": LlamaConfig(name="qwen2-0.5b", architecture="Qwen2ForCausalLM", hidden_size=896,
                              num_layers=24, num_heads=14, num_kv_heads=2, ffn_dim=4864, vocab_size=151936,
                              max_positions=32768, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                              tie_word_embeddings=True, pad_token_id=151643, bos_token_id=151643,
                              eos_token_ids=(151643,)),
    "qwen2-7b": LlamaConfig(name="qwen2-7b", architecture="Qwen2ForCausalLM", hidden_size=3584, num_layers=28,
                            num_heads=28, num_kv_heads=4, ffn_dim=18944, vocab_size=152064, max_positions=32768,
                            rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, pad_token_id=151643,
                            bos_token_id=151643, eos_token_ids=(151643,)),
}
FAMILY_PREFIXES = ("llama", "mistral", "qwen")


def is_llama_family(name: str) -> bool:
    return name.lower().startswith(FAMILY_PREFIXES)


def llama_preset(name: str, *, num_layers: int | None = None, hidden_size: int | None = None,
                 num_heads: int | None = None) -> LlamaConfig:
    """A published size by name ("llama-1b"), optionally shrunk: --hidden keeps 64-wide heads and the
    preset's ratio of query to KV heads (at least one KV head), the MLP 4x hidden (as in OPT's)."""
    key = name.lower()
    if key not in LLAMA_PRESETS:
        raise ModelConfigError(f"unknown Llama-family size {name!r}; known: {', '.join(LLAMA_PRESETS)}")
    cfg = LLAMA_PRESETS[key]
    if hidden_size is not None:
        heads = heads_for_hidden(hidden_size, num_heads)
        cfg = replace(cfg, hidden_size=hidden_size, num_heads=heads, num_kv_heads=_kv_heads(heads, cfg.group_size),
                      ffn_dim=4 * hidden_size, head_dim_override=None)
    elif num_heads is not None:
        cfg = replace(cfg, num_heads=num_heads, num_kv_heads=_kv_heads(num_heads, cfg.group_size))
    if num_layers is not None:
        cfg = replace(cfg, num_layers=num_layers)
    return cfg


def _kv_heads(heads: int, group_size: int) -> int:
    """KV heads for `heads` query heads, near the preset's group size and dividing `heads`."""
    kv = max(1, heads // group_size)
    while heads % kv:
        kv -= 1
    return kv
