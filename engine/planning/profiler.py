"""Measure this host for the cost model in a few seconds, and keep the result.

The probes are in engine.planning.disk_probes (disk bandwidth and latency, page cache bypassed)
and engine.planning.compute_probes (FLOP/s, linear-layer table, memory and link bandwidths); the
engine's own layer is timed by engine.planning.calibration. The profile is stored as JSON
(engine.planning.profile_store: keyed by host, device and disk directory) and reused until it is
older than MAX_AGE_S or a refresh is asked for.
"""
from __future__ import annotations

import dataclasses
import shutil
import socket
import time
from pathlib import Path

import psutil
import torch

from engine.model.config import OPTConfig, model_key
from engine.planning.calibration import calibration_bytes, eviction_bytes, measure_compute_scale
from engine.model import native_attention
from engine.planning.compute_probes import (convert_gbps, cpu_attention_gbps, dequant_gbps, device_copy_gbps,
                                            four_bit_linear_table, linear_table, matmul_flops, op_overhead_s,
                                            pinned_copy_gbps, weight_stream_gbps)
from engine.planning.disk_probes import (DEFAULT_DISK_BYTES, cpu_busy, measure_disk, measure_disk_latency,
                                         measure_io_interference)
from engine.planning.hardware import PROFILE_VERSION, HardwareProfile
from engine.planning.profile_store import profile_path
from engine.planning.timing import sync_for, timed, typical, watch_load
from engine.runtime.devices import DTYPE_NAMES, dtype_name, resolve_dtype, torch_dtype

MAX_AGE_S = 7 * 24 * 3600
CPU_DTYPES = (torch.float32, torch.bfloat16)  # the dtypes a CPU-side computation may run in


def load_or_measure_profile(disk_dir: str | Path, refresh: bool = False, *,
                            home: Path | None = None, disk_bytes: int | None = None,
                            seconds_per_test: float = 0.25, max_age_s: float = MAX_AGE_S,
                            model: OPTConfig | None = None) -> HardwareProfile:
    """The stored profile of this host and disk directory, measured now if missing or stale.
    With `model`, it also holds that model's own compute calibration (measured once and stored)."""
    path = profile_path(disk_dir, home)
    prof = None
    if not refresh and path.is_file():
        try:
            prof = HardwareProfile.load(path)
        except ValueError:
            prof = None
        if prof is not None and (prof.version != PROFILE_VERSION or prof.age_s() >= max_age_s):
            prof = None
    if prof is None:
        prof = measure_profile(disk_dir, disk_bytes=disk_bytes, seconds_per_test=seconds_per_test)
        prof.save(path)
    if model is not None and model_key(model) not in prof.model_compute_scale:
        prof = calibrate_model(prof, model, seconds_per_test)
        prof.save(path)
    return prof


def calibrate_model(prof: HardwareProfile, model: OPTConfig, seconds_per_test: float = 0.25) -> HardwareProfile:
    """`prof` plus `model`'s own compute calibration (one layer and the head at its dimensions), when
    a layer and the head fit in a tenth of the free RAM; else `prof` unchanged (the generic scale)."""
    device = prof.compute_device
    dtype = _engine_dtype(prof.has_gpu)
    free = (torch.cuda.mem_get_info()[0] if device == "cuda" else psutil.virtual_memory().available)
    if calibration_bytes(model, dtype, device) > free / 10:
        return prof
    scale = measure_compute_scale(prof, device, dtype,
                                  lambda fn, before=None: typical(fn, 2 * seconds_per_test, sync_for(device), before), model)
    return prof.replace(model_compute_scale={**prof.model_compute_scale, model_key(model): scale})


def _engine_dtype(has_gpu: bool) -> torch.dtype:
    """The engine's default compute dtype on this host (fp16 on CUDA; bf16 only on CPUs with native
    bf16 matmul, else fp32): the profile must time what the engine will run."""
    return resolve_dtype(None, torch.device("cuda" if has_gpu else "cpu"))


def measure_profile(disk_dir: str | Path, *, disk_bytes: int | None = None,
                    seconds_per_test: float = 0.25) -> HardwareProfile:
    """Measure this host. Every probe keeps its fastest call; when the calls spread widely, the
    process gets too little of a core, or the load average exceeds the cores, the profile says
    `busy` (its figures are likely too low)."""
    with watch_load() as watch:
        prof = _measure_probes(disk_dir, disk_bytes=disk_bytes, seconds_per_test=seconds_per_test)
    seen = watch.verdict()
    return prof.replace(busy=seen.busy, load_seen={"load_avg": seen.load_avg, "cores": seen.cores,
                                                   "spread": seen.spread, "cpu_share": seen.cpu_share})


def _measure_probes(disk_dir: str | Path, *, disk_bytes: int | None, seconds_per_test: float) -> HardwareProfile:
    disk_dir = Path(disk_dir)
    disk_bytes = disk_bytes or DEFAULT_DISK_BYTES
    disk_dir.mkdir(parents=True, exist_ok=True)
    has_gpu = torch.cuda.is_available()
    dtype = _engine_dtype(has_gpu)
    cpu_dtype = _engine_dtype(False)  # what CPU-side work (attention, RAM weights) runs in
    fields: dict = {}
    if has_gpu:
        disk = measure_disk(disk_dir, disk_bytes)
    else:
        # Without a GPU the engine reads the disk while the same cores compute (virtio and the copy
        # out of the block layer need CPU too): on a 2-core VM reads under a matmul load ran at
        # 0.8 GB/s against 1.2-1.3 alone. The cost model needs what the engine will see.
        with cpu_busy(dtype):
            disk = measure_disk(disk_dir, disk_bytes)
        disk = dataclasses.replace(disk, method=disk.method + ", under compute load")
        fields["io_compute_interference"] = measure_io_interference(disk_dir, dtype, seconds_per_test)
    read_lat, write_lat = measure_disk_latency(disk_dir, seconds_per_test)
    flops = {"cpu": {dtype_name(dt): matmul_flops("cpu", dt, seconds_per_test) for dt in CPU_DTYPES}}
    if has_gpu:
        flops["cuda"] = {name: matmul_flops("cuda", torch_dtype(name), seconds_per_test) for name in DTYPE_NAMES}
        c2g, g2c = pinned_copy_gbps(seconds_per_test)
        props = torch.cuda.get_device_properties(0)
        fields.update(gpu_name=props.name, cpu_to_gpu_gbps=c2g, gpu_to_cpu_gbps=g2c,
                      gpu_mem_gbps=device_copy_gbps(seconds_per_test), gpu_mem_gib=props.total_memory / 2 ** 30)
    device = "cuda" if has_gpu else "cpu"
    prof = HardwareProfile(
        host=socket.gethostname(), source=f"measured by flexjob (torch {torch.__version__})",
        created_at=time.time(), disk_dir=str(disk_dir.resolve()), disk_read_method=disk.method,
        compute_dtype=dtype_name(dtype),
        disk_read_gbps=disk.read_gbps, disk_write_gbps=disk.write_gbps, disk_read_latency_s=read_lat,
        disk_write_latency_s=write_lat,
        cpu_mem_gbps=weight_stream_gbps(seconds_per_test, dtype=cpu_dtype, stream_bytes=eviction_bytes()),
        cpu_attention_gbps=cpu_attention_gbps(seconds_per_test, dtype=cpu_dtype),
        cpu_attention_in_place=native_attention.available(),
        dequant_gbps=dequant_gbps(device, dtype, seconds_per_test),
        convert_gbps=convert_gbps(dtype, seconds_per_test) if dtype != torch.float16 else 0.0,
        matmul_flops=flops, op_overhead_s=op_overhead_s(device, dtype),
        linear_s_per_byte=linear_table(device, dtype, seconds_per_test),
        linear_streamed_s_per_byte=linear_table(device, dtype, seconds_per_test, packed=False) if device == "cpu" else {},
        linear_4bit_s_per_byte=four_bit_linear_table(dtype, seconds_per_test) if device == "cpu" else {},
        cpu_mem_gib=psutil.virtual_memory().total / 2 ** 30,
        disk_free_gib=shutil.disk_usage(disk_dir).free / 2 ** 30, **fields)
    scale = measure_compute_scale(prof, device, dtype,
                                  lambda fn, before=None: typical(fn, 2 * seconds_per_test, sync_for(device), before))
    return prof.replace(compute_scale=scale)
