"""A store's uncompressed tensors converted once to the compute dtype, on disk, where that dtype is
two bytes wide like the store's fp16 (bfloat16 on a CPU): a tensor streamed from the disk tier every
step is then read straight into a buffer that the math uses as it lies, instead of being read and
converted each time (opt-1.3b over capacity on two Zen4 cores: converting ~1.2 GB of streamed
weights took ~0.45 s of each 2.4 s decode step, on the cores that compute).

One file per layer, <store root>/<dtype>/<layer>.bin: the layer's store file with each
uncompressed tensor converted where it lies, so it has the same size and every entry the same
offset (compressed tensors keep their stored bytes; they are never read from here). The values
are the fp16 ones converted, as the per-step conversion gives them: outputs do not change.
Written once (tiers.write_once): a file that exists is complete.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from engine.model.checkpoint import TensorEntry
from engine.runtime.tiers import align_up, write_once


class ConvertedFiles:
    def __init__(self, store_root: Path, dtype: torch.dtype) -> None:
        self.dir = store_root / str(dtype).removeprefix("torch.")
        self.dtype = dtype

    def path(self, layer: str) -> Path:
        return self.dir / f"{layer}.bin"

    def ensure(self, layer: str, entries: list[TensorEntry], read: Callable[[TensorEntry], torch.Tensor]) -> None:
        """Write `layer`'s file unless it exists; `read(entry)` gives an entry's stored bytes (at least
        entry.nbytes of them)."""
        def write(f) -> None:
            for entry in entries:
                stored = read(entry)[:entry.nbytes]
                if not entry.compressed:
                    stored = stored.view(torch.float16).to(self.dtype).view(torch.uint8)
                f.seek(entry.offset)
                f.write(stored.numpy().tobytes())
            f.truncate(max((e.offset + align_up(e.nbytes) for e in entries), default=0))

        write_once(self.path(layer), write)

    def tensor(self, buf: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
        """The converted tensor inside `buf`, a read of its entry's bytes from this file: a view, no copy."""
        return buf[:entry.nbytes].view(self.dtype).view(entry.shape)
