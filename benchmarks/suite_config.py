"""The suite's settings (full and `--quick`), the host facts every report carries, and the models it
makes: random-weight OPT and Llama-family models of the real dimensions (engine.model.synthetic),
cached in the work dir."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class ModelShape:
    """A published size by preset name ("opt-1.3b", "llama-8b"), optionally shrunk; None keeps the
    published depth or width."""
    size: str
    num_layers: int | None = None
    hidden_size: int | None = None

    @property
    def name(self) -> str:
        depth = f"-{self.num_layers}l" if self.num_layers else ""
        width = f"-h{self.hidden_size}" if self.hidden_size else ""
        return f"{self.size}{depth}{width}"


@dataclass(frozen=True, kw_only=True)
class SuiteConfig:
    """What every part runs. Blocks are engine shapes (gpu_batch_size, num_gpu_batches)."""
    suite: str = "cpu"
    model_size: str = "1.3b"
    num_layers: int | None = None  # None: the published depth
    work_dir: Path = Path("/tmp/flexjob-bench-suite")
    out_dir: Path = Path(__file__).resolve().parent / "results"
    prompt_len: int = 128
    gen_len: int = 32
    # In RAM: transformers' batches and the engine's blocks, alternated.
    hf_batches: tuple[int, ...] = (16, 32)
    ram_blocks: tuple[tuple[int, int], ...] = ((32, 1), (64, 1))
    # Over capacity: the engine under cpu_mem, and accelerate with the same max_memory. The engine runs
    # the planner's pick (blocks <= disk_max_block rows), as `flexjob work --cpu-mem` would, and each
    # of disk_blocks with the hand-written placement disk_percent (none in the full suite, which
    # keeps to its 30 minutes; `bench_engine.py --disk-blocks 16x2` runs it beside the pick).
    cpu_mem: float = 2.0
    disk_max_block: int = 64
    disk_percent: str = "0 10 0 0 100 0"
    disk_blocks: tuple[tuple[int, int], ...] = ()
    hf_disk_batch: int = 16
    # Planner pick vs hand-written policies (names from bench_planner_sweep.HAND_WRITTEN).
    planner_policies: tuple[str, ...] = ("all RAM 8x1", "all RAM 16x1", "cache on disk 16x2", "weights 80% RAM 16x1",
                                         "weights 50% RAM 16x1", "weights 50% RAM 16x2", "weights on disk 16x1",
                                         "4-bit weights in RAM 16x1", "cache 50% on disk 32x1",
                                         "weights 80% RAM 32x1")
    planner_max_block: int = 32
    planner_cpu_mem: float = 4.0  # room for the all-in-RAM policies next to the disk-bound ones
    planner_repeats: int = 1  # rounds over the policies, the median run of each counting (~10 min a round)
    # Compression on/off: weights read from disk each step, uncompressed vs 4-bit.
    compression_block: tuple[int, int] = (8, 1)
    # Job runner overhead: whole path vs engine alone on a small model.
    jobrunner_size: str = "125m"
    jobrunner_layers: int = 4
    jobrunner_rows: int = 64
    jobrunner_new_tokens: int = 16
    commit_blocks: int = 100
    # Reliability (opt-in parts): shards for the claim race; the chaos run's size.
    claims_shards: int = 2000
    chaos_quick: bool = False
    # Llama-family rows: the ram part's settings on a 1B, the disk part's on an 8B (16 GB of fp16
    # weights) under llama_disk_cpu_mem, which also holds the 8B's 1 GiB embedding and 1 GiB head.
    llama_ram: ModelShape = ModelShape("llama-1b")
    llama_disk: ModelShape = ModelShape("llama-8b")
    llama_disk_cpu_mem: float = 8.0
    # GPU suite: FlexLLMGen side by side (FlexGen's benchmark settings).
    gpu_prompt_len: int = 512
    gpu_percent: str = "100 0 100 0 100 0"
    gpu_block: tuple[int, int] = (32, 1)
    parts: tuple[str, ...] = field(default_factory=tuple)

    def quick(self) -> SuiteConfig:
        """Everything shrunk so the whole suite takes seconds per run: 125m with 2 layers (the Llama
        models: 2 layers, hidden 256), gen 4, one policy or block each."""
        return replace(self, model_size="125m", num_layers=2, prompt_len=16, gen_len=4, hf_batches=(4,),
                       ram_blocks=((4, 1),), disk_blocks=((4, 1),), disk_max_block=8, hf_disk_batch=4, cpu_mem=1.0,
                       planner_policies=("all RAM 8x1",), planner_max_block=8, planner_cpu_mem=1.0,
                       compression_block=(4, 1),
                       jobrunner_layers=2, jobrunner_rows=8, jobrunner_new_tokens=4, commit_blocks=10,
                       claims_shards=200, chaos_quick=True,
                       llama_ram=ModelShape("llama-1b", 2, 256), llama_disk=ModelShape("llama-8b", 2, 256),
                       llama_disk_cpu_mem=1.0,
                       gpu_prompt_len=16, gpu_block=(4, 1))

    @property
    def model_shape(self) -> ModelShape:
        """The suite's OPT, which every part but the Llama ones runs."""
        return ModelShape(f"opt-{self.model_size}", self.num_layers)

    @property
    def model_name(self) -> str:
        return self.model_shape.name


def cpu_flags() -> dict[str, bool]:
    """Which of the SIMD/matrix extensions that decide the engine's dtype and speed this CPU has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {flag: False for flag in CPU_FLAGS}
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {flag: flag in flags for flag in CPU_FLAGS}


def present_flags() -> str:
    """The flags of CPU_FLAGS this CPU has, space-separated (for a report's heading)."""
    return " ".join(flag for flag, present in cpu_flags().items() if present)


def host_facts() -> dict:
    """Host name, CPU model, core count and flags: the context every figure needs."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"host": os.uname().nodename, "cpu": model, "cores": os.cpu_count(), "flags": cpu_flags()}


def ensure_model(cfg: SuiteConfig, shape: ModelShape | None = None) -> Path:
    """A model directory (default: the suite's OPT), written once with random weights and reused by
    later runs."""
    from engine.model.config import preset
    from engine.model.synthetic import make_model

    shape = shape or cfg.model_shape
    path = cfg.work_dir / "models" / shape.name
    done = path / ".complete"  # written last: an interrupted make is redone, not reused half-written
    if not done.is_file():
        print(f"making {shape.name} (random weights) in {path}", flush=True)
        make_model(preset(shape.size, num_layers=shape.num_layers, hidden_size=shape.hidden_size), path)
        done.write_text("ok\n")
    return path
