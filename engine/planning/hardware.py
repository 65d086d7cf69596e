"""What a machine can do, as the cost model sees it: bandwidths, FLOP/s and capacities.

A HardwareProfile is written by `engine.planning.profiler` (measured on this host) or by hand / from a
file (`flexjob plan --hardware FILE`) to size a machine one does not have. Units: bandwidths in
GB/s (1e9 bytes/s), FLOP/s as plain numbers, capacities in GiB (2**30 bytes) like the budgets.

The engine reports per block a dict `{link: (bytes, seconds)}` with the link names of
engine.runtime.tiers; `LINK_FIELDS` maps each to the profile field holding its bandwidth, which the
bandwidth monitor compares them with.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.runtime.tiers import CPU_TO_GPU, DISK_READ, DISK_WRITE, GPU_TO_CPU

# Which profile field holds the bandwidth of each link.
LINK_FIELDS = {
    DISK_READ: "disk_read_gbps",
    DISK_WRITE: "disk_write_gbps",
    CPU_TO_GPU: "cpu_to_gpu_gbps",
    GPU_TO_CPU: "gpu_to_cpu_gbps",
}

PROFILE_HINT = "write one with engine.planning.profiler.measure_profile(...).save(FILE), or by hand"
# The calibration point of a prefill layer whose freed intermediates the allocator keeps (the
# "prefill" point faults each in anew: engine.planning.calibration).
PREFILL_KEPT = "prefill_kept"
PROFILE_VERSION = 19  # a stored profile of another version is measured again: its fields mean other things


@dataclass(frozen=True, kw_only=True)
class HardwareProfile:
    # Where and when it was measured (or "manual" for a hand-written profile).
    host: str = "unknown"
    source: str = "manual"
    created_at: float = 0.0
    disk_dir: str = ""
    disk_read_method: str = "unknown"  # "O_DIRECT" | "fadvise" | "page-cache" | "manual"

    # The compute device: "cuda" when a GPU is present, else "cpu" (then the GPU tier is RAM).
    gpu_name: str | None = None
    compute_dtype: str = "bfloat16"

    # Bandwidths, GB/s.
    disk_read_gbps: float = 1.0
    disk_write_gbps: float = 1.0
    disk_read_latency_s: float = 0.0     # one small uncached read: the floor of every disk read
    disk_write_latency_s: float = 0.0    # one small page-aligned write as the disk tier does it (O_DIRECT)
    cpu_mem_gbps: float = 20.0           # streaming read of weights by a matmul on the CPU
    cpu_to_gpu_gbps: float = 0.0         # pinned host -> device; 0 without a GPU
    gpu_to_cpu_gbps: float = 0.0
    gpu_mem_gbps: float = 0.0            # device memory bandwidth (HBM/GDDR)
    cpu_attention_gbps: float = 10.0     # KV-cache bytes a decode attention on the CPU gets through per s
    # Whether the CPU attends every part of the cache where it lies, each pair's context only (the
    # native kernel, engine.model.native_attention); else whole KEY_ALIGN groups, and a part on
    # disk or compressed is first copied into the aligned layout (the library path).
    cpu_attention_in_place: bool = False
    dequant_gbps: float = 5.0            # fp16 output bytes/s of 4-bit group-wise decompression on the compute device
    convert_gbps: float = 0.0            # fp16 -> compute dtype conversion of weights read from disk (0: none)
    # Seconds of compute lost per second the disk tier is busy, on a host without a GPU (the I/O
    # thread's syscalls, copies and Python share the cores that compute); measured by the profiler.
    io_compute_interference: float = 0.0
    # Disk figures blend in what the engine measured in finished blocks (engine.planning.profile_store):
    # the probe's own figures, by field, and how many blocks were learned from.
    probed_gbps: dict[str, float] = field(default_factory=dict)
    learned_blocks: int = 0

    # matmul FLOP/s by device ("cpu", "cuda") and dtype ("float32", "bfloat16", "float16").
    matmul_flops: dict[str, dict[str, float]] = field(default_factory=dict)
    # Seconds per weight byte (compute dtype) of a linear layer on the compute device, by the number
    # of input rows ("1", "32", ...), weights beyond the caches. Decode micro-batches sit between the
    # memory roofline and peak FLOP/s, where kernels reach neither; empty: the cost model's roofline.
    linear_s_per_byte: dict[str, float] = field(default_factory=dict)
    # The same for a matrix streamed from disk, which the CPU engine multiplies unpacked (the table
    # above is for matrices held in RAM, packed once: engine.model.packed_weight); empty: the same.
    linear_streamed_s_per_byte: dict[str, float] = field(default_factory=dict)
    # The same for generated tokens over a 4-bit matrix on the CPU's 4-bit kernel
    # (engine.model.four_bit), per byte of the matrix in the compute dtype; empty: the table above.
    linear_4bit_s_per_byte: dict[str, float] = field(default_factory=dict)
    # Measured / predicted compute time of the engine's own decoder layer, by phase ("prefill",
    # "decode"; "prefill:T" per prefill micro-batch of T tokens, "decode:R" and "head:R" per decode
    # micro-batch of R rows): what the kernels measured alone leave out
    # (engine.planning.calibration); empty: 1.
    compute_scale: dict[str, float] = field(default_factory=dict)
    # The same measured for one model's dimensions (`engine.model.config.model_key`): filled in when
    # a model is planned on this host.
    model_compute_scale: dict[str, dict[str, float]] = field(default_factory=dict)
    op_overhead_s: float = 2e-5          # fixed cost of one small kernel launch / op dispatch

    # Capacities, GiB.
    gpu_mem_gib: float = 0.0
    cpu_mem_gib: float = 16.0
    disk_free_gib: float = 100.0

    # Whether the host was busy while measured (figures likely too low: measure again when it is
    # quiet), and what showed it: the 1-minute load average at the start, the usable cores, the
    # median over the probes of (median call / fastest call), and the share of a core a spinning
    # thread got (engine.planning.timing).
    busy: bool = False
    load_seen: dict[str, float] = field(default_factory=dict)

    version: int = PROFILE_VERSION

    @property
    def has_gpu(self) -> bool:
        return self.gpu_name is not None

    @property
    def compute_device(self) -> str:
        return "cuda" if self.has_gpu else "cpu"

    def flops(self, device: str | None = None, dtype: str | None = None) -> float:
        """Dense matmul FLOP/s of `device` in `dtype` (defaults: the compute device and dtype)."""
        device = device or self.compute_device
        dtype = dtype or self.compute_dtype
        by_dtype = self.matmul_flops.get(device, {})
        if dtype in by_dtype:
            return by_dtype[dtype]
        if by_dtype:  # an unmeasured dtype: assume the slowest measured one
            return min(by_dtype.values())
        return 1e11

    def linear_seconds(self, rows: float, weight_bytes: float, *, streamed: bool = False,
                       four_bit: bool = False) -> float | None:
        """Seconds of one linear layer over `rows` input rows and `weight_bytes` of weights, from the
        measured table (a power law between row counts; beyond the largest, time grows with the rows:
        compute-bound) of matrices held in memory, `streamed` from disk, or 4-bit on a 4-bit kernel
        (`four_bit`); None without a table."""
        table = ((four_bit and self.linear_4bit_s_per_byte) or (streamed and self.linear_streamed_s_per_byte)
                 or self.linear_s_per_byte)
        if not table:
            return None
        points = sorted((float(m), t) for m, t in table.items())
        rows = max(float(rows), points[0][0])
        if rows >= points[-1][0]:
            return weight_bytes * points[-1][1] * rows / points[-1][0]
        for (m0, t0), (m1, t1) in zip(points, points[1:]):
            if rows <= m1:  # a power law between the two: exact where time is flat (memory-bound) or
                # grows with the rows (compute-bound); a straight line in log(rows) overcounts the
                # latter (1024 rows between 512 and 2048: 1.24x), which a prefill's calibration at
                # 1024 rows then carried into 2048- and 4096-row predictions as a 0.8x error
                frac = math.log(rows / m0) / math.log(m1 / m0)
                if t0 > 0 and t1 > 0:
                    return weight_bytes * t0 * (t1 / t0) ** frac
                return weight_bytes * (t0 + frac * (t1 - t0))
        raise AssertionError("unreachable")

    def has_scale(self, model: str, part: str) -> bool:
        """Whether `scale_for` has a measured figure for `part` (else it answers 1.0)."""
        own = self.model_compute_scale.get(model) or self.compute_scale
        return part in own or any(k.startswith(part + ":") for k in own)

    def scale_for(self, model: str, part: str, rows: float) -> float:
        """Measured / predicted compute of `part` ("prefill", "decode": a decoder layer; "head": the
        output head) at `rows` rows per micro-batch (a prefill's: its tokens, rows x prompt
        length): the model's own calibration where there is one
        (log-interpolated between the row counts timed), else the generic one (opt-1.3b's dimensions)."""
        own = self.model_compute_scale.get(model) or self.compute_scale
        points = sorted((float(k.split(":")[1]), v) for k, v in own.items() if k.startswith(part + ":"))
        if points:
            rows = min(max(float(rows), points[0][0]), points[-1][0])
            for (m0, s0), (m1, s1) in zip(points, points[1:]):
                if rows <= m1:
                    return s0 + math.log(rows / m0) / math.log(m1 / m0) * (s1 - s0)
            return points[-1][1]
        return own.get(part, 1.0)

    def link_gbps(self, link: str) -> float:
        return float(getattr(self, LINK_FIELDS[link]))

    def with_links(self, gbps: dict[str, float]) -> "HardwareProfile":
        """A copy with some link bandwidths replaced (measured values, or a throttle)."""
        return dataclasses.replace(self, **{LINK_FIELDS[link]: float(v) for link, v in gbps.items()})

    def replace(self, **changes) -> "HardwareProfile":
        return dataclasses.replace(self, **changes)

    def age_s(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.created_at

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hardware profile fields: {', '.join(unknown)}")
        data = dict(data)
        if "matmul_flops" in data:
            data["matmul_flops"] = {dev: {dt: float(v) for dt, v in by.items()}
                                    for dev, by in data["matmul_flops"].items()}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HardwareProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")  # writers may share a directory
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        from engine.errors import EngineInputError

        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            raise EngineInputError(f"hardware profile {path} does not exist", PROFILE_HINT,
                                   parameter="hardware_profile") from None
        except (ValueError, TypeError) as exc:
            raise EngineInputError(f"hardware profile {path} is not valid: {exc}", PROFILE_HINT,
                                   parameter="hardware_profile") from None


def t4_flexgen() -> HardwareProfile:
    """The GCP T4 machine of the FlexGen paper, with the constants FlexLLMGen's cost model fitted
    (experimental/cost_model.py): 16 GB T4, 208 GB RAM, 1.5 TB NVMe.

    Their model has separate numbers per tensor kind; we take one per link: cpu->gpu 12.89,
    gpu->cpu 4.82 (their hidden-state figure; 0.97 for cache copies from pageable memory),
    disk->cpu 0.473, cpu->disk 0.746 (their cache figure). Prefill matmul 21.24 TFLOP/s fp16;
    their CPU attention constant (0.0123 TFLOP/s over 4*ctx*h FLOPs per row for 4*ctx*h cache
    bytes) is 12.3 GB/s of cache; the T4 spec gives 320 GB/s of GDDR6.
    """
    return HardwareProfile(
        host="gcp-t4-flexgen", source="FlexLLMGen experimental/cost_model.py constants",
        disk_read_method="manual", gpu_name="Tesla T4", compute_dtype="float16",
        disk_read_gbps=0.473, disk_write_gbps=0.746, cpu_mem_gbps=20.0,
        cpu_to_gpu_gbps=12.89, gpu_to_cpu_gbps=4.82, gpu_mem_gbps=320.0,
        cpu_attention_gbps=12.3, dequant_gbps=100.0,
        matmul_flops={"cuda": {"float16": 21.24e12, "float32": 8.1e12}, "cpu": {"float32": 1.0e12}},
        op_overhead_s=1e-5, gpu_mem_gib=16.0, cpu_mem_gib=200.0, disk_free_gib=1500.0,
    )
