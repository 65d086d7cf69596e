"""The Llama family's math (Llama 2/3, Mistral, Qwen2) as pure functions over weight tensors.

Follows Hugging Face `LlamaForCausalLM` (Touvron et al. 2023; Mistral and Qwen2 differ only in
config): RMSNorm computed in float32, rotary position embeddings (Su et al. 2021) with Llama 3.1's
`llama3` frequency scaling, grouped-query attention (Ainslie et al. 2023), a SiLU-gated MLP, an
output head tied to the token embedding or not. The functions have OPT's signatures
(engine.model.opt), so the schedule runs either family; what differs is in the pairs:
the cache holds (row, KV head) pairs, and each pair's queries are the `group_size` query heads that
share its KV head, stacked along the query axis ([B*Hkv, group*S, D], head-major), so one call of
engine.model.attention.attend serves a whole group with its KV read once.
Shapes: B rows, S new positions, h hidden, H query heads, Hkv KV heads, D head_dim.
"""
from __future__ import annotations

import functools
import math

import torch

from engine.model.kernels import gated_mlp, linear
from engine.model.llama_config import LlamaConfig
from engine.model.opt import cache_rows, embedding, positions_from_mask  # noqa: F401 (the same in both families)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: the mean square in float32, the gain applied in h's dtype."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


@functools.lru_cache(maxsize=8)
def inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """RoPE's inverse frequencies [D/2] (float32, computed as HF computes them)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    old_context = s.original_max_positions
    low_wavelen, high_wavelen = old_context / s.low_freq_factor, old_context / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)  # long wavelengths: slowed by `factor`
    smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotary(cfg: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, 1, D] in `dtype` for positions [B, S] (-1 at left padding: any value works there)."""
    freqs = positions[..., None].float() * inverse_frequencies(cfg).to(positions.device)  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, S, heads*D] -> the same with RoPE applied per head
    B, S, _ = x.shape
    x = x.view(B, S, heads, -1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).view(B, S, -1)


def input_embed(w: dict, cfg: LlamaConfig, token_ids: torch.Tensor, positions: torch.Tensor,
                dtype: torch.dtype, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    # token_ids: [B, S] -> [B, S, h]; positions enter at every layer's q and k (RoPE), not here
    return embedding(token_ids, w["embed_tokens.weight"], dtype)


def output_logits(w: dict, cfg: LlamaConfig, h: torch.Tensor) -> torch.Tensor:
    # h: [B, h] (the last position only) -> logits [B, vocab] in float32 for sampling; always the
    # generated way (one row per row and step, also after a prefill: engine.model.opt)
    return linear(rms_norm(h, w["norm.weight"], cfg.rms_norm_eps), w["lm_head.weight"]).float()


def qkv(w: dict, cfg: LlamaConfig, h: torch.Tensor, positions: torch.Tensor,
        prompt: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h: [B, S, h], positions [B, S] -> q (rotated, pre-scaled) [B, S, H*D], k (rotated), v [B, S, Hkv*D]."""
    x = rms_norm(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
    q = linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"), prompt)
    k = linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"), prompt)
    v = linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"), prompt)
    cos, sin = rotary(cfg, positions, x.dtype)
    return _rotate(q, cfg.num_heads, cos, sin).mul_(cfg.head_dim ** -0.5), _rotate(k, cfg.num_kv_heads, cos, sin), v


def to_pairs(cfg: LlamaConfig, x: torch.Tensor) -> torch.Tensor:
    """Queries [B, S, H*D] -> [B*Hkv, group*S, D]: each (row, KV head) pair's query heads, head-major."""
    B, S, _ = x.shape
    G, D = cfg.group_size, cfg.head_dim
    return x.view(B, S, cfg.num_kv_heads, G, D).permute(0, 2, 3, 1, 4).reshape(B * cfg.num_kv_heads, G * S, D)


def from_pairs(cfg: LlamaConfig, x: torch.Tensor) -> torch.Tensor:
    """[B*Hkv, group*S, D] -> [B, S, H*D] (query head i belongs to KV head i // group, as in HF)."""
    n, GS, D = x.shape
    B, G = n // cfg.num_kv_heads, cfg.group_size
    S = GS // G
    return x.view(B, cfg.num_kv_heads, G, S, D).permute(0, 3, 1, 2, 4).reshape(B, S, -1)


def attention_output(w: dict, cfg: LlamaConfig, residual: torch.Tensor, attn: torch.Tensor,
                     prompt: bool | torch.Tensor = False) -> torch.Tensor:
    return linear(attn, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"), prompt).add_(residual)


def mlp(w: dict, cfg: LlamaConfig, h: torch.Tensor, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    # h: [B, S, h] -> [B, S, h]: down(silu(gate(x)) * up(x)) + h
    x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return gated_mlp(x, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"], prompt).add_(h)
