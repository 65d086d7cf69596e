"""Planner commands: `profile` (measure this host) and `plan` (the best policy for a model and budgets)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from jobrunner.cli.main import main

BUILTIN_HARDWARE = ("t4-flexgen",)


def _default_disk_dir() -> Path:
    from engine.runtime.paths import engine_home

    return engine_home()


def load_hardware(hardware: str | None, disk_dir: Path | None, refresh: bool = False, model=None):
    """A profile file, a built-in machine by name, or this host (measured once, then reused; with
    `model`, its own layer is timed once too)."""
    from engine.planning.hardware import HardwareProfile, t4_flexgen
    from engine.planning.profiler import load_or_measure_profile

    if hardware == "t4-flexgen":
        return t4_flexgen()
    if hardware:
        return HardwareProfile.load(hardware)
    return load_or_measure_profile(disk_dir or _default_disk_dir(), refresh=refresh, model=model)


def _model_config(model_dir: Path | None, size: str | None):
    from engine.model.config import load_config, preset
    from jobrunner.errors import UserError

    if (model_dir is None) == (size is None):
        raise UserError("give exactly one of --model DIR and --size SIZE",
                        hint="e.g. `flexjob plan --size 1.3b --cpu-mem 8`")
    return load_config(model_dir) if model_dir is not None else preset(size)


@main.command("profile")
@click.option("--offload-dir", "--disk-dir", "disk_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the disk tier to measure (default: $FLEXJOB_HOME, else the user data directory).")
@click.option("--refresh", is_flag=True, help="Measure again even if a fresh profile is stored.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON (the format --hardware reads).")
def profile_command(disk_dir: Path | None, refresh: bool, as_json: bool) -> None:
    """Measure this host for the planner: disk read (page cache bypassed) and write (fsync),
    weight-streaming bandwidth, matmul FLOP/s, CPU attention, host<->GPU copies. Takes a few
    seconds; the result is stored and reused until a week old or --refresh.

    \b
    Example:
      flexjob profile --offload-dir /nvme/flexjob
      flexjob profile --json > mybox.json && flexjob plan --hardware mybox.json --size 30b ...
    """
    from engine.planning.profile_store import profile_path

    disk_dir = disk_dir or _default_disk_dir()
    prof = load_hardware(None, disk_dir, refresh=refresh)
    if prof.busy:  # on stderr: the JSON on stdout stays readable
        click.echo(busy_warning(prof), err=True)
    if as_json:
        click.echo(prof.to_json())
        return
    from rich.table import Table

    table = Table(title=f"hardware profile of {prof.host} ({prof.gpu_name or 'no GPU: the compute device is the CPU'})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    def learned(field: str) -> str:  # engine.planning.profile_store: what runs measured, and the probe's figure
        probe = prof.probed_gbps.get(field)
        return "" if probe is None else f"  (runs: {prof.learned_blocks} blocks; probe {probe:.3f})"

    rows = [
        ("disk read (GB/s)", f"{prof.disk_read_gbps:.3f}  [{prof.disk_read_method}]{learned('disk_read_gbps')}"),
        ("disk write with fsync (GB/s)", f"{prof.disk_write_gbps:.3f}{learned('disk_write_gbps')}"),
        ("CPU weight streaming (GB/s)", f"{prof.cpu_mem_gbps:.2f}"),
        ("CPU attention over the KV cache (GB/s)", f"{prof.cpu_attention_gbps:.3f}"),
        ("4-bit dequantisation (GB/s out)", f"{prof.dequant_gbps:.3f}"),
    ]
    if prof.has_gpu:
        rows += [("CPU -> GPU pinned (GB/s)", f"{prof.cpu_to_gpu_gbps:.2f}"),
                 ("GPU -> CPU pinned (GB/s)", f"{prof.gpu_to_cpu_gbps:.2f}"),
                 ("GPU memory (GB/s)", f"{prof.gpu_mem_gbps:.0f}")]
    for device, by_dtype in prof.matmul_flops.items():
        for dtype, flops in by_dtype.items():
            rows.append((f"matmul {device} {dtype} (GFLOP/s)", f"{flops / 1e9:.1f}"))
    if prof.linear_s_per_byte:
        from engine.planning.cost_inputs import elem_bytes

        elem = elem_bytes(prof)  # FLOPs per weight byte: 2 * rows / elem
        rows.append((f"linear layer, {prof.compute_dtype} (rows: GFLOP/s)",
                     "  ".join(f"{m}: {2 * int(m) / elem / t / 1e9:.0f}"
                               for m, t in sorted(prof.linear_s_per_byte.items(), key=lambda kv: int(kv[0])))))
    for phase, scale in prof.compute_scale.items():
        rows.append((f"engine layer / sum of kernels, {phase}", f"{scale:.2f}"))
    rows += [("op dispatch (us)", f"{prof.op_overhead_s * 1e6:.1f}"),
             ("GPU / CPU memory, disk free (GiB)",
              f"{prof.gpu_mem_gib:.1f} / {prof.cpu_mem_gib:.1f} / {prof.disk_free_gib:.0f}")]
    for name, value in rows:
        table.add_row(name, value)
    console = _console()
    console.print(table)
    console.print(f"stored in {profile_path(disk_dir)} (disk dir {prof.disk_dir})")


def busy_warning(prof) -> str:
    """One line: the profile was measured on a busy host, what showed it, and what to do."""
    load = prof.load_seen
    seen = (f"load {load.get('load_avg', 0):.1f} on {load.get('cores', 0):.0f} cores, "
            f"{load.get('cpu_share', 1):.0%} of a core free, median probe call "
            f"{load.get('spread', 1):.1f}x its fastest")
    return (f"warning: this host was busy while it was profiled ({seen}), so its figures may be far too low; "
            f"hint: run `flexjob profile --refresh` again on a quiet machine")


@main.command("plan")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory (OPT, Llama, Mistral, Qwen2).")
@click.option("--size", default=None, help="A published size instead of a directory: OPT (125m ... 175b) or "
                                           "the Llama family (llama-1b ... llama-70b, mistral-7b, qwen2-7b).")
@click.option("--gpu-mem", type=float, default=None, help="GPU budget, GiB (default: the whole GPU).")
@click.option("--cpu-mem", type=float, default=None, help="CPU memory budget, GiB (default: all RAM).")
@click.option("--disk-mem", type=float, default=None, help="Disk budget, GiB (default: free space).")
@click.option("--prompt-len", type=int, default=512, show_default=True)
@click.option("--gen-len", type=int, default=32, show_default=True)
@click.option("--hardware", default=None,
              help="A profile JSON file (as `flexjob profile --json` writes) or 't4-flexgen'; default: this host.")
@click.option("--offload-dir", "--disk-dir", "disk_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Disk tier directory to profile when --hardware is not given.")
@click.option("--compression", type=click.Choice(["auto", "off", "on"]), default="auto", show_default=True,
              help="Consider 4-bit compression of weights and cache.")
@click.option("--max-block-size", type=int, default=None, help="Cap gpu_batch_size x num_gpu_batches.")
@click.option("--alternatives", type=int, default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(model_dir, size, gpu_mem, cpu_mem, disk_mem, prompt_len, gen_len, hardware, disk_dir,
                 compression, max_block_size, alternatives, as_json) -> None:
    """Choose the placement policy (FlexGen's LP) for a model, budgets and workload.

    \b
    Example:
      flexjob plan --size 175b --hardware t4-flexgen --gpu-mem 16 --cpu-mem 200 --disk-mem 1500
      flexjob plan --model models/opt-1.3b --cpu-mem 4 --prompt-len 128 --gen-len 32 --json
    """
    from engine.planning.planner import plan
    from jobrunner.worker.replan import worker_reserved_gib

    cfg = _model_config(model_dir, size)
    hw = load_hardware(hardware, disk_dir, model=cfg)
    gpu_mem = gpu_mem if gpu_mem is not None else (hw.gpu_mem_gib if hw.has_gpu else None)
    cpu_mem = cpu_mem if cpu_mem is not None else hw.cpu_mem_gib
    options = {"auto": (False, True), "off": (False,), "on": (True,)}[compression]
    result = plan(cfg, hw, gpu_mem_gib=gpu_mem, cpu_mem_gib=cpu_mem, disk_mem_gib=disk_mem,
                  prompt_len=prompt_len, gen_len=gen_len, compress_options=options,
                  max_block_size=max_block_size, num_alternatives=alternatives,
                  cpu_reserved_gib=worker_reserved_gib())
    if as_json:
        out = {"model": cfg.name, "hardware": {"host": hw.host, "source": hw.source, "gpu": hw.gpu_name},
               "prompt_len": prompt_len, "gen_len": gen_len, **result.to_dict()}
        click.echo(json.dumps(out, indent=2))
        return
    _print_plan(cfg, hw, result, prompt_len, gen_len)


def _print_plan(cfg, hw, result, prompt_len: int, gen_len: int) -> None:
    from rich.table import Table

    budgets = ", ".join(f"{t} {round(v, 1):g} GiB" for t, v in result.budgets_gib.items() if v is not None)
    table = Table(title=f"{cfg.name} on {hw.host} ({hw.gpu_name or 'CPU only'}); prompt {prompt_len}, "
                        f"gen {gen_len}; budgets {budgets}")
    for col in ("", "batch x n", "weights %", "cache %", "act %", "flags",
                "tokens/s", "GPU GiB", "CPU GiB", "disk GiB", "bound by"):
        table.add_column(col, justify="right" if col not in ("", "flags", "bound by") else "left",
                         no_wrap=True)
    table.caption = "percents are GPU/CPU/disk; GiB are predicted peaks"
    for rank, cand in enumerate([result] + list(result.alternatives)):
        pol, est = cand.policy, cand.estimate
        pct = ["/".join(f"{v:.3g}" for v in (getattr(pol, f"{kind}_gpu_percent"),
                                             getattr(pol, f"{kind}_cpu_percent"), pol.disk_percent(kind)))
               for kind in ("weights", "cache", "activations")]
        flags = ",".join(f for f, on in (("compress", pol.compress_weight), ("cpu-attn", pol.cpu_cache_compute))
                         if on) or "-"
        table.add_row("chosen" if rank == 0 else f"alt {rank}", f"{pol.gpu_batch_size} x {pol.num_gpu_batches}",
                      *pct, flags, f"{est.tokens_per_s:.3g}", f"{est.peak_gib['gpu']:.2f}",
                      f"{est.peak_gib['cpu']:.2f}", f"{est.peak_gib['disk']:.1f}", est.bottleneck,
                      style="bold" if rank == 0 else None)
    console = _console()
    console.print(table)
    p = result.policy
    flags = "".join([" --cpu-cache-compute" if p.cpu_cache_compute else "",
                     " --compress-weight" if p.compress_weight else "",
                     " --compress-cache" if p.compress_cache else ""])
    console.print(f"flags: --percent {' '.join(f'{v:g}' for v in p.percents)} --gpu-batch-size "
                  f"{p.gpu_batch_size} --num-gpu-batches {p.num_gpu_batches}{flags}", soft_wrap=True)
    console.print(f"{result.solved} LPs solved, {result.skipped} shapes pruned by the compute bound; "
                  f"predicted block time {result.estimate.total_s:.4g} s "
                  f"(prefill {result.estimate.prefill_s:.3g} s, decode step {result.estimate.decode_step_s:.3g} s)")


def _console():
    from rich.console import Console

    console = Console()
    # Not a terminal (a pipe, a test): rich would wrap to 80 columns and cut the numbers.
    return console if console.is_terminal else Console(width=max(console.width, 150))
