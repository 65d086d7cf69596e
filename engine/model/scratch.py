"""Buffers a thread reuses from call to call: attention rewrites its aligned keys, values and
scores every call, and prompt tokens' copy of a 4-bit matrix is remade for every matrix."""
from __future__ import annotations

import math
import threading

import torch

_SCRATCH = threading.local()


def reused(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `shape` that the calling thread reuses from call to call (grown when too small):
    attention rewrites its aligned keys, values and scores every call, and a fresh multi-MB tensor
    would cost its page faults every time (the engine's allocator unmaps big blocks when freed)."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    # A buffer made under inference_mode (the profiler's probes) cannot be written outside it.
    numel, key = math.prod(shape), (slot, dtype, device, torch.is_inference_mode_enabled())
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key][:numel].view(shape)
