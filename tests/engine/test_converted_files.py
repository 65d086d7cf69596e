"""In bfloat16 on a CPU, tensors streamed from the disk tier are read from a copy of the store
converted once (engine.runtime.converted_files): the copy holds the store's fp16 values converted,
at the store's offsets; it is written once; a run streaming from it gives the ids of a run holding
every weight in RAM; a disk that fills up while it is written leaves no partial copy behind."""
from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

from engine.model.config import load_config
from engine.runtime.converted_files import ConvertedFiles
from engine.runtime.engine import Engine
from engine.runtime.policy import Policy
from engine.runtime.rows import GenerationParams, RowInput

PROMPTS = [tuple(2 + (i * 7 + j) % 500 for j in range(5 + 3 * i)) for i in range(6)]


def _generate(model, offload, percents, gbs, nbs):
    policy = Policy.from_percents(percents, gpu_batch_size=gbs, num_gpu_batches=nbs)
    with Engine(model, policy, dtype="bfloat16", offload_dir=offload) as engine:
        rows = [RowInput(row_id=i, prompt_ids=p) for i, p in enumerate(PROMPTS)]
        results = engine.generate(rows, GenerationParams(max_new_tokens=6))
        return engine.weights.store, [r.generated_ids for r in results]


def test_streamed_weights_come_from_a_converted_copy_with_the_same_output(tiny_model, tmp_path):
    _, in_ram = _generate(tiny_model, tmp_path / "o", (100, 0, 100, 0, 100, 0), 6, 1)
    store, streamed = _generate(tiny_model, tmp_path / "o", (0, 0, 0, 0, 100, 0), 2, 3)
    assert streamed == in_ram
    files = ConvertedFiles(store.root, torch.bfloat16)
    written = 0
    for layer, entries in store.layers.items():
        if not files.path(layer).exists():
            continue
        written += 1
        stored, copy = store.path(layer).read_bytes(), files.path(layer).read_bytes()
        assert len(copy) == len(stored)
        for e in entries:
            if e.compressed:
                continue
            fp16 = torch.frombuffer(bytearray(stored[e.offset:e.offset + e.nbytes]), dtype=torch.float16)
            got = torch.frombuffer(bytearray(copy[e.offset:e.offset + e.nbytes]), dtype=torch.bfloat16)
            assert torch.equal(got, fp16.to(torch.bfloat16)), f"{layer}/{e.name}"
    assert written == load_config(tiny_model).num_layers + 1  # every decoder layer and the head
    before = {p: p.stat().st_mtime_ns for p in files.dir.iterdir()}
    _, again = _generate(tiny_model, tmp_path / "o", (0, 0, 0, 0, 100, 0), 2, 3)
    assert again == in_ram
    assert {p: p.stat().st_mtime_ns for p in files.dir.iterdir()} == before  # written once


def test_a_full_disk_leaves_no_partial_copy(tiny_model, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    store, _ = _generate(tiny_model, tmp_path / "o", (100, 0, 100, 0, 100, 0), 6, 1)
    layer = next(name for name in store.layers if name.startswith("decoder."))
    size = store.path(layer).stat().st_size
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 2}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        files = ConvertedFiles(mount_point, torch.bfloat16)
        data = store.path(layer).read_bytes()
        with pytest.raises(OSError) as failed:
            files.ensure(layer, store.layers[layer],
                         lambda e: torch.frombuffer(bytearray(data[e.offset:e.offset + e.nbytes]), dtype=torch.uint8))
        assert failed.value.errno == errno.ENOSPC
        assert list(files.dir.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
