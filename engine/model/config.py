"""OPT model dimensions: read from a Hugging Face config.json, or taken from the published sizes.

The preset table holds the dimensions of every released facebook/opt-* model (Zhang et al. 2022,
table 1; the HF config.json files), so that `flexjob make-model` and the planner work on real shapes.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from engine.errors import ModelConfigError
from engine.model import llama_config
from engine.model.llama_config import LlamaConfig
from engine.model.llama_presets import is_llama_family, llama_preset
from engine.model.shrink import heads_for_hidden


@dataclass(frozen=True, kw_only=True)
class OPTConfig:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int = 50272
    max_positions: int = 2048
    word_embed_proj_dim: int | None = None  # != hidden_size only for opt-350m (project_in/out)
    do_layer_norm_before: bool = True  # False only for opt-350m (post-LayerNorm)
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def num_kv_heads(self) -> int:
        """Heads the KV cache holds per row (every head: OPT has no grouped-query attention)."""
        return self.num_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.eos_token_id,)

    tie_word_embeddings = True  # lm_head is the token embedding

    @property
    def mlp_width(self) -> int:
        """Columns of the MLP's intermediate activations (fc1's output)."""
        return self.ffn_dim

    @property
    def has_projections(self) -> bool:
        return self.embed_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before

    def layer_param_count(self) -> int:
        h, f = self.hidden_size, self.ffn_dim
        return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attention, MLP, two LayerNorms

    def lookup_table_param_count(self) -> int:
        """The token and position embedding tables (rows gathered, not multiplied)."""
        return self.vocab_size * self.embed_dim + (self.max_positions + 2) * self.hidden_size

    def param_count(self) -> int:
        embed = self.lookup_table_param_count()
        proj = 2 * self.embed_dim * self.hidden_size if self.has_projections else 0
        final_ln = 2 * self.hidden_size if self.has_final_layer_norm else 0
        return embed + proj + final_ln + self.num_layers * self.layer_param_count()

    def to_hf_dict(self) -> dict:
        """The config.json a Hugging Face OPTForCausalLM loads."""
        return {
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "activation_function": "relu",
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "layerdrop": 0.0,
            "init_std": 0.02,
            "enable_bias": True,
            "layer_norm_elementwise_affine": True,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions,
            "word_embed_proj_dim": self.embed_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "torch_dtype": "float16",
            "use_cache": True,
            "_name_or_path": self.name,
        }


# A model's config: OPT's, or the Llama family's (engine.model.llama_config).
ModelConfig = OPTConfig | LlamaConfig


def model_key(cfg: ModelConfig) -> str:
    """What a layer's speed depends on: its dimensions (not its depth or its weights)."""
    if isinstance(cfg, LlamaConfig):
        return llama_config.model_key(cfg)
    return f"h{cfg.hidden_size}-f{cfg.ffn_dim}-a{cfg.num_heads}-v{cfg.vocab_size}-e{cfg.embed_dim}"


def layer_tensor_shapes(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of one decoder layer, in checkpoint order."""
    if isinstance(cfg, LlamaConfig):
        return llama_config.layer_tensor_shapes(cfg)
    h, f = cfg.hidden_size, cfg.ffn_dim
    shapes = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        shapes += [(f"self_attn.{proj}.weight", (h, h)), (f"self_attn.{proj}.bias", (h,))]
    shapes += [("self_attn_layer_norm.weight", (h,)), ("self_attn_layer_norm.bias", (h,)),
               ("fc1.weight", (f, h)), ("fc1.bias", (f,)), ("fc2.weight", (h, f)), ("fc2.bias", (h,)),
               ("final_layer_norm.weight", (h,)), ("final_layer_norm.bias", (h,))]
    return shapes


def hf_tensor_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of a HF OPTForCausalLM checkpoint (lm_head is tied to embed_tokens)."""
    if isinstance(cfg, LlamaConfig):
        yield from llama_config.hf_tensor_shapes(cfg)
        return
    h, p = cfg.hidden_size, "model.decoder."
    yield p + "embed_tokens.weight", (cfg.vocab_size, cfg.embed_dim)
    yield p + "embed_positions.weight", (cfg.max_positions + 2, h)  # OPT offsets positions by 2
    if cfg.has_projections:
        yield p + "project_in.weight", (h, cfg.embed_dim)
        yield p + "project_out.weight", (cfg.embed_dim, h)
    if cfg.has_final_layer_norm:
        yield p + "final_layer_norm.weight", (h,)
        yield p + "final_layer_norm.bias", (h,)
    for i in range(cfg.num_layers):
        for name, shape in layer_tensor_shapes(cfg):
            yield f"{p}layers.{i}.{name}", shape


# name -> (hidden, layers, heads, ffn); all use vocab 50272 and 2048 positions.
_PUBLISHED = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-350m": (1024, 24, 16, 4096),
    "opt-1.3b": (2048, 24, 32, 8192),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
    "opt-30b": (7168, 48, 56, 28672),
    "opt-66b": (9216, 64, 72, 36864),
    "opt-175b": (12288, 96, 96, 49152),
}


def _preset(name: str, dims: tuple[int, int, int, int]) -> OPTConfig:
    hidden, layers, heads, ffn = dims
    if name == "opt-350m":
        return OPTConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=ffn,
                         word_embed_proj_dim=512, do_layer_norm_before=False)
    return OPTConfig(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, ffn_dim=ffn)


PRESETS: dict[str, OPTConfig] = {name: _preset(name, dims) for name, dims in _PUBLISHED.items()}
# A fast test model with the structure of opt-125m.
PRESETS["opt-tiny"] = OPTConfig(name="opt-tiny", hidden_size=64, num_layers=2, num_heads=4, ffn_dim=256)


def preset(name: str, *, num_layers: int | None = None, hidden_size: int | None = None,
           num_heads: int | None = None) -> ModelConfig:
    """A published size by name ("opt-1.3b" or "1.3b"; "llama-1b", engine.model.llama_presets),
    optionally shrunk for tests."""
    if is_llama_family(name):
        return llama_preset(name, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads)
    key = name if name.startswith("opt-") else f"opt-{name}"
    if key not in PRESETS:
        raise ModelConfigError(f"unknown OPT size {name!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[key]
    if hidden_size is not None:
        heads = heads_for_hidden(hidden_size, num_heads)
        cfg = replace(cfg, hidden_size=hidden_size, num_heads=heads, ffn_dim=4 * hidden_size,
                      word_embed_proj_dim=(hidden_size // 2 if cfg.has_projections else None))
    elif num_heads is not None:
        cfg = replace(cfg, num_heads=num_heads)
    if num_layers is not None:
        cfg = replace(cfg, num_layers=num_layers)
    return cfg


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read an OPT or Llama-family config.json (chosen by its `architectures`); clear errors for a
    missing dir, missing file or another architecture."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelConfigError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelConfigError(f"model path {model_dir} is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{model_dir} has no config.json (is it a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from None
    architectures = raw.get("architectures") or []
    if architectures and architectures[0] in llama_config.ARCHITECTURES:
        try:
            return llama_config.from_hf_dict(raw, path, model_dir.name)
        except KeyError as exc:
            raise ModelConfigError(f"{path} lacks the field {exc.args[0]!r}") from None
    if raw.get("model_type") != "opt":
        found = f"architectures {architectures}" if architectures else \
            f"no architectures field (model_type {raw.get('model_type')!r})"
        raise ModelConfigError(f"{path}: {found}; flexjob runs OPTForCausalLM and "
                               f"{', '.join(llama_config.ARCHITECTURES)} models only")
    if raw.get("activation_function", "relu") != "relu":
        raise ModelConfigError(f"{path}: activation {raw['activation_function']!r} is not supported")
    try:
        hidden = int(raw["hidden_size"])
        return OPTConfig(
            name=str(raw.get("_name_or_path") or model_dir.name),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=int(raw["num_attention_heads"]),
            ffn_dim=int(raw["ffn_dim"]),
            vocab_size=int(raw["vocab_size"]),
            max_positions=int(raw.get("max_position_embeddings", 2048)),
            word_embed_proj_dim=(int(raw["word_embed_proj_dim"])
                                 if raw.get("word_embed_proj_dim", hidden) != hidden else None),
            do_layer_norm_before=bool(raw.get("do_layer_norm_before", True)),
            pad_token_id=int(raw.get("pad_token_id", 1)),
            bos_token_id=int(raw.get("bos_token_id", 2)),
            eos_token_id=int(raw.get("eos_token_id", 2)),
        )
    except KeyError as exc:
        raise ModelConfigError(f"{path} lacks the field {exc.args[0]!r}") from None
