"""Llama-family dimensions (Llama 2/3, Mistral, Qwen2): read from a Hugging Face config.json.

One decoder shape covers the family: RMSNorm, rotary positions (RoPE, optionally with Llama 3.1's
`llama3` frequency scaling), grouped-query attention (num_key_value_heads <= num_attention_heads),
a SiLU-gated MLP, q/k/v biases for Qwen2 (`attention_bias` for Llama), a tied or untied output head.
What the family's checkpoints hold beyond that (mixtures of experts, other RoPE scalings, sliding
windows that a sequence can reach) is refused with one line naming the config field.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelConfigError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MOE_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


@dataclass(frozen=True, kw_only=True)
class Llama3Scaling:
    """Llama 3.1's RoPE frequency scaling (`rope_scaling` with rope_type "llama3")."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_positions: int


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    name: str
    architecture: str = "LlamaForCausalLM"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int  # intermediate_size of the gated MLP
    vocab_size: int
    max_positions: int = 4096
    head_dim_override: int | None = None  # config.json's head_dim where it is not hidden / heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3Scaling | None = None
    qkv_bias: bool = False  # Qwen2, or Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias only
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_id(self) -> int:
        return self.eos_token_ids[0]

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def mlp_width(self) -> int:
        """Columns of the MLP's intermediate activations: gate and up projections live together."""
        return 2 * self.ffn_dim

    has_projections = False  # no project_in/out (OPT-350m's)
    has_final_layer_norm = True  # the final RMSNorm

    def layer_param_count(self) -> int:
        return sum(_numel(shape) for _, shape in layer_tensor_shapes(self))

    def lookup_table_param_count(self) -> int:
        return self.vocab_size * self.hidden_size

    def param_count(self) -> int:
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return (self.lookup_table_param_count() + head + self.hidden_size
                + self.num_layers * self.layer_param_count())

    def to_hf_dict(self) -> dict:
        """The config.json Hugging Face's class for `architecture` loads."""
        raw = {
            "architectures": [self.architecture], "model_type": MODEL_TYPES[self.architecture],
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.ffn_dim, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "hidden_act": "silu", "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "torch_dtype": "float16", "use_cache": True, "_name_or_path": self.name,
        }
        if self.rope_scaling is not None:
            s = self.rope_scaling
            raw["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                   "high_freq_factor": s.high_freq_factor,
                                   "original_max_position_embeddings": s.original_max_positions}
        if self.architecture == "LlamaForCausalLM":
            raw |= {"attention_bias": self.qkv_bias, "mlp_bias": False}
        if self.architecture != "LlamaForCausalLM":
            raw |= {"sliding_window": None, "use_sliding_window": False}
        return raw


def layer_tensor_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of one decoder layer, in checkpoint order."""
    h, f, q, kv = cfg.hidden_size, cfg.ffn_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("input_layernorm.weight", (h,))]
    for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes.append((f"self_attn.{proj}.weight", (rows, h)))
        if cfg.qkv_bias:
            shapes.append((f"self_attn.{proj}.bias", (rows,)))
    shapes.append(("self_attn.o_proj.weight", (h, q)))
    if cfg.o_bias:
        shapes.append(("self_attn.o_proj.bias", (h,)))
    return shapes + [("post_attention_layernorm.weight", (h,)), ("mlp.gate_proj.weight", (f, h)),
                     ("mlp.up_proj.weight", (f, h)), ("mlp.down_proj.weight", (h, f))]


def store_tensor_specs(cfg: LlamaConfig, layer: str) -> list[tuple[str, tuple[int, ...]]]:
    """(engine tensor name, shape) of one engine layer ("embed", "decoder.i", "head")."""
    if layer == "embed":
        return [("embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))]
    if layer == "head":
        return [("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)), ("norm.weight", (cfg.hidden_size,))]
    return layer_tensor_shapes(cfg)


def checkpoint_name(cfg: LlamaConfig, layer: str, name: str) -> str:
    """The HF checkpoint's name of an engine tensor; a tied head reads the token embedding."""
    if name == "lm_head.weight":
        return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if layer.startswith("decoder."):
        return f"model.layers.{layer.split('.')[1]}.{name}"
    return f"model.{name}"


def hf_tensor_shapes(cfg: LlamaConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF checkpoint (no lm_head.weight when tied)."""
    yield "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
    for i in range(cfg.num_layers):
        for name, shape in layer_tensor_shapes(cfg):
            yield f"model.layers.{i}.{name}", shape
    yield "model.norm.weight", (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, cfg.hidden_size)


def model_key(cfg: LlamaConfig) -> str:
    """What a layer's speed depends on (engine.model.config.model_key for this family)."""
    return (f"llama-h{cfg.hidden_size}-f{cfg.ffn_dim}-a{cfg.num_heads}-k{cfg.num_kv_heads}-d{cfg.head_dim}"
            f"-v{cfg.vocab_size}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _refuse(path: Path, field: str, problem: str) -> ModelConfigError:
    return ModelConfigError(f"{path}: {field} {problem}", "flexjob runs Llama, Mistral and Qwen2 models with "
                            "full attention, dense MLPs and default or llama3 RoPE")


def _rope(raw: dict, path: Path) -> tuple[float, Llama3Scaling | None]:
    """rope_theta and the llama3 scaling, from the classic fields or transformers' rope_parameters."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise _refuse(path, "rope_scaling", f"type {kind!r} is not supported (supported: llama3)")
    try:
        return theta, Llama3Scaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                                    high_freq_factor=float(scaling["high_freq_factor"]),
                                    original_max_positions=int(scaling["original_max_position_embeddings"]))
    except KeyError as exc:
        raise _refuse(path, "rope_scaling", f"lacks {exc.args[0]!r}") from None


def _check_supported(raw: dict, path: Path, architecture: str) -> None:
    for field in MOE_FIELDS:
        if raw.get(field):
            raise _refuse(path, field, "is set: mixture-of-experts models are not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise _refuse(path, "hidden_act", f"{raw['hidden_act']!r} is not supported (supported: silu)")
    if raw.get("mlp_bias"):
        raise _refuse(path, "mlp_bias", "is true: MLP biases are not supported")
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(path, "partial_rotary_factor", "is not 1: partial rotary embeddings are not supported")
    if architecture == "Qwen2ForCausalLM" and raw.get("use_sliding_window") and \
            int(raw.get("max_window_layers", 0)) < int(raw["num_hidden_layers"]):
        raise _refuse(path, "use_sliding_window", "is true: sliding-window attention layers are not supported")


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def from_hf_dict(raw: dict, path: Path, name: str) -> LlamaConfig:
    """A Llama-family config.json (already parsed); `path` names it in errors."""
    architecture = raw["architectures"][0]
    _check_supported(raw, path, architecture)
    theta, scaling = _rope(raw, path)
    heads = int(raw["num_attention_heads"])
    max_positions = int(raw.get("max_position_embeddings", 4096))
    window = raw.get("sliding_window") if architecture == "MistralForCausalLM" else None
    if window:  # a window no sequence reaches changes nothing: sequences are kept within it
        max_positions = min(max_positions, int(window))
    eos = _ids(raw.get("eos_token_id")) or (2,)
    bias = bool(raw.get("attention_bias", False))
    return LlamaConfig(
        name=str(raw.get("_name_or_path") or name), architecture=architecture,
        hidden_size=int(raw["hidden_size"]), num_layers=int(raw["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads), ffn_dim=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]), max_positions=max_positions,
        head_dim_override=int(raw["head_dim"]) if raw.get("head_dim") else None,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        qkv_bias=architecture == "Qwen2ForCausalLM" or bias,
        o_bias=architecture == "LlamaForCausalLM" and bias,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        pad_token_id=int(raw["pad_token_id"]) if raw.get("pad_token_id") is not None else eos[0],
        bos_token_id=int(raw["bos_token_id"]) if raw.get("bos_token_id") is not None else None,
        eos_token_ids=eos)
