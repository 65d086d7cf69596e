"""Calibrate the cost model's compute term against the engine's own decoder layer.

The profile's kernel figures (a linear layer's time per weight byte, attention bandwidth, op
dispatch) are each measured alone. A real layer also runs LayerNorms, ReLU, residual adds, the
cache append and allocations between them, and it allocates its multi-MB intermediates fresh (the engine
returns big blocks to the OS at once to keep RSS within --cpu-mem, so each costs page faults). So the profiler times
`engine.layers` itself on an opt-1.3b-sized layer, for a prefill micro-batch and a decode step,
and stores measured / predicted per phase (`HardwareProfile.compute_scale`), which the cost model
applies to every layer's compute.
"""
from __future__ import annotations

import dataclasses

import torch

from engine import layers
from engine.hardware import HardwareProfile
from engine.model_config import preset
from engine.model_maker import layer_tensor_shapes

PREFILL_ROWS, PROMPT_LEN = 8, 128      # one prefill micro-batch: 1024 tokens
DECODE_ROWS, GEN_LEN = 32, 16           # one decode step attends over prompt + gen/2 = 136 positions


def _layer_weights(cfg, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Values do not matter for timing (and filling is fast); LayerNorm gains of 0.01 are harmless.
    return {name: torch.full(shape, 0.01, device=device, dtype=dtype) for name, shape in layer_tensor_shapes(cfg)}


def _layer_step(cfg, w, h: torch.Tensor, cache: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
    """What the schedule runs for one micro-batch in one layer (cache in RAM): q/k/v, append to the
    position-major cache [T, 2, B, h], attend over it, output projection and MLP."""
    q, k, v = layers.qkv(w, cfg, h)
    s = h.shape[1]
    cache[start:start + s].copy_(layers.cache_rows(k, v))
    full = cache[:start + s]
    attn = layers.attend(cfg, q, full[:, 0], full[:, 1], mask)
    return layers.mlp(w, cfg, layers.attention_output(w, cfg, h, attn))


def measure_compute_scale(hw: HardwareProfile, device: str, dtype: torch.dtype, timed) -> dict[str, float]:
    """{"prefill": measured / predicted, "decode": ...} for one opt-1.3b layer on `device`.
    `timed(fn)` returns the median seconds per call (the profiler's timer)."""
    from engine.cost_model import Placement, Shape, phase_terms
    from engine.policy import Policy

    from engine.budgets import limit_allocator_slack

    limit_allocator_slack()  # the engine's allocator setting: big intermediates cost page faults there
    cfg = preset("1.3b", num_layers=1)
    dev = torch.device(device)
    w = _layer_weights(cfg, dev, dtype)
    hid, total = cfg.hidden_size, PROMPT_LEN + GEN_LEN
    measured = {}
    with torch.inference_mode():
        x = torch.full((PREFILL_ROWS, PROMPT_LEN, hid), 0.1, device=dev, dtype=dtype)
        cache = torch.zeros(total, 2, PREFILL_ROWS, hid, device=dev, dtype=dtype)
        mask = layers.attention_mask(torch.ones(PREFILL_ROWS, PROMPT_LEN, dtype=torch.bool, device=dev),
                                     PROMPT_LEN)
        measured["prefill"] = timed(lambda: _layer_step(cfg, w, x, cache, 0, mask))
        context = PROMPT_LEN + GEN_LEN // 2
        x = torch.full((DECODE_ROWS, 1, hid), 0.1, device=dev, dtype=dtype)
        cache = torch.full((total, 2, DECODE_ROWS, hid), 0.1, device=dev, dtype=dtype)
        mask = torch.ones(DECODE_ROWS, 1, 1, context + 1, dtype=torch.bool, device=dev)
        measured["decode"] = timed(lambda: _layer_step(cfg, w, x, cache, context, mask))
    unscaled = dataclasses.replace(hw, compute_scale={})
    scale = {}
    for phase, rows in (("prefill", PREFILL_ROWS), ("decode", DECODE_ROWS)):
        policy = Policy.from_percents([0, 100, 0, 100, 0, 100], gpu_batch_size=rows)
        sh = Shape.from_policy(policy, prompt_len=PROMPT_LEN, gen_len=GEN_LEN)
        (_, layer), _head = phase_terms(cfg, unscaled, sh, Placement.from_policy(policy),
                                        decode=phase == "decode")
        scale[phase] = measured[phase] / float(layer["compute"])
    return scale
