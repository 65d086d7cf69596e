"""OPT's math as pure functions over weight tensors (no nn.Module, no placement, no I/O).

Follows Hugging Face `OPTForCausalLM` exactly (Zhang et al. 2022): learned positions offset by 2
and derived from the attention mask, pre- or post-LayerNorm (opt-350m is post-LN and has
project_in/out), ReLU MLP, lm_head tied to the token embedding.
Shapes: B rows, S new positions, T cached + new positions, h hidden, H heads, D head_dim.
Every weight dict maps the checkpoint's tensor names (without the layer prefix) to tensors that are
already on the compute device in the compute dtype. `prompt` says which rows are prompt tokens
(True, False, or a bool tensor over the leading dims): the linear layers pick their library by it
(engine.model.kernels.linear).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.config import OPTConfig
from engine.model.kernels import linear, relu_mlp
from engine.runtime.compression import QuantizedTensor, dequantize

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding reserves the first two rows
LN_EPS = 1e-5


def embedding(ids: torch.Tensor, table, dtype: torch.dtype) -> torch.Tensor:
    """Rows of a lookup table; a 4-bit table (QuantizedTensor, grouped along its rows) is gathered
    packed and only those rows are dequantised; a table that is not in memory comes as a function
    from ids to their rows. ids: [B, S] -> [B, S, dim]."""
    if callable(table):
        return table(ids).to(dtype)
    if isinstance(table, QuantizedTensor):
        rows = QuantizedTensor(data=table.data[ids], scale=table.scale[ids], minimum=table.minimum[ids],
                               shape=(*ids.shape, table.shape[-1]), dim=ids.dim(),
                               group_size=table.group_size, num_bits=table.num_bits)
        return dequantize(rows, dtype)
    return F.embedding(ids, table).to(dtype)  # an fp16 table: convert only these rows


def input_embed(w: dict, cfg: OPTConfig, token_ids: torch.Tensor, positions: torch.Tensor,
                dtype: torch.dtype, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    # token_ids, positions: [B, S] (positions are -1 at left padding, as in HF) -> [B, S, h]
    h = embedding(token_ids, w["embed_tokens.weight"], dtype)
    if cfg.has_projections:
        h = linear(h, w["project_in.weight"], prompt=prompt)
    return h + embedding(positions + POSITION_OFFSET, w["embed_positions.weight"], h.dtype)



def output_logits(w: dict, cfg: OPTConfig, h: torch.Tensor) -> torch.Tensor:
    # h: [B, h] (the last position only) -> logits [B, vocab] in float32 for sampling. Its rows are
    # one per row and step, a decode step's few, also after a prefill: always the generated way.
    if cfg.has_final_layer_norm:
        h = F.layer_norm(h, (cfg.hidden_size,), w["final_layer_norm.weight"], w["final_layer_norm.bias"], LN_EPS)
    if cfg.has_projections:
        h = linear(h, w["project_out.weight"])
    return linear(h, w["lm_head.weight"]).float()


def _layer_norm(w: dict, name: str, h: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(h, (h.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], LN_EPS)


def qkv(w: dict, cfg: OPTConfig, h: torch.Tensor, positions: torch.Tensor | None = None,
        prompt: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention block's input projections. h: [B, S, h] -> q (pre-scaled), k, v: [B, S, h].
    `positions` is unused: OPT's positions enter once, at the embedding (rotary families use them here)."""
    x = _layer_norm(w, "self_attn_layer_norm", h) if cfg.do_layer_norm_before else h
    # In-place where the operand is a fresh intermediate: every new multi-MB tensor costs memory
    # traffic, and page faults where it is bigger than the allocator keeps (budgets.configure_allocator).
    q = linear(x, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"], prompt).mul_(cfg.head_dim ** -0.5)
    k = linear(x, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"], prompt)
    v = linear(x, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"], prompt)
    return q, k, v


def cache_rows(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v: [B, S, h] -> the cache's position-major rows [S, 2, B, h] (a view; see kv_cache)."""
    return torch.stack((k, v)).permute(2, 0, 1, 3)


def to_pairs(cfg: OPTConfig, x: torch.Tensor) -> torch.Tensor:
    """[B, S, h] -> [B*H, S, D]: the queries of every (row, head) pair, in the cache's pair order."""
    B, S, _ = x.shape
    return x.view(B, S, cfg.num_heads, cfg.head_dim).transpose(1, 2).reshape(B * cfg.num_heads, S, cfg.head_dim)


def from_pairs(cfg: OPTConfig, x: torch.Tensor) -> torch.Tensor:
    """[B*H, S, D] -> [B, S, h]."""
    n, S, D = x.shape
    return x.view(n // cfg.num_heads, cfg.num_heads, S, D).transpose(1, 2).reshape(n // cfg.num_heads, S, -1)


def attention_output(w: dict, cfg: OPTConfig, residual: torch.Tensor, attn: torch.Tensor,
                     prompt: bool | torch.Tensor = False) -> torch.Tensor:
    h = linear(attn, w["self_attn.out_proj.weight"], w["self_attn.out_proj.bias"], prompt).add_(residual)
    return h if cfg.do_layer_norm_before else _layer_norm(w, "self_attn_layer_norm", h)


def mlp(w: dict, cfg: OPTConfig, h: torch.Tensor, prompt: bool | torch.Tensor = False) -> torch.Tensor:
    # h: [B, S, h] -> [B, S, h]
    x = _layer_norm(w, "final_layer_norm", h) if cfg.do_layer_norm_before else h
    h = relu_mlp(x, w["fc1.weight"], w["fc1.bias"], w["fc2.weight"], w["fc2.bias"], prompt).add_(h)
    return h if cfg.do_layer_norm_before else _layer_norm(w, "final_layer_norm", h)


def positions_from_mask(valid: torch.Tensor) -> torch.Tensor:
    """HF OPT's positions: count of real tokens before each position, -1 at padding. [B, T] -> [B, T]."""
    v = valid.long()
    return torch.cumsum(v, dim=1) * v - 1
