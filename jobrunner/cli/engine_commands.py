"""Engine commands: `make-model` (random-weight OPT or Llama-family model) and `generate` (one prompt,
FlexGen's flags)."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from engine.runtime.devices import DTYPE_NAMES
from jobrunner.cli.main import main


@main.command("make-model")
@click.argument("size")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the model into (created).")
@click.option("--layers", type=int, default=None, help="Keep only this many decoder layers (fast tests).")
@click.option("--hidden", type=int, default=None,
              help="Shrink the hidden size (heads = hidden/64; Llama family: KV heads keep the size's ratio).")
@click.option("--heads", type=int, default=None, help="Number of attention heads.")
@click.option("--seed", type=int, default=0, show_default=True)
def make_model_command(size: str, out_dir: Path, layers: int | None, hidden: int | None,
                       heads: int | None, seed: int) -> None:
    """Write a random-weight model of a published SIZE plus an offline tokenizer, as a Hugging Face
    model directory: OPT (125m ... 175b, or tiny) or the Llama family (llama-1b, llama-3b, llama-8b,
    llama-70b, llama2-7b, mistral-7b, qwen2-0.5b, qwen2-7b).

    \b
    Example:
      flexjob make-model 1.3b -o models/opt-1.3b
      flexjob make-model 125m --layers 2 -o models/test
      flexjob make-model llama-1b --layers 2 --hidden 256 -o models/llama-test
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from engine.model.config import preset
    from engine.model.synthetic import make_model

    from engine.errors import ModelConfigError
    from jobrunner.errors import UserError

    try:
        cfg = preset(size, num_layers=layers, hidden_size=hidden, num_heads=heads)
    except ModelConfigError as exc:
        raise UserError(str(exc), "SIZE is one of the sizes above, such as 125m, opt-1.3b or llama-1b; "
                                  "--layers and --hidden make it smaller") from None
    replaced = _converted_copies(out_dir)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  transient=True) as progress:
        task = progress.add_task(f"writing {cfg.name}", total=None)
        make_model(cfg, out_dir, seed=seed,
                   on_tensor=lambda _n, done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote {cfg.name} ({cfg.param_count() / 1e9:.3f}B parameters, {cfg.num_layers} layers) "
               f"to {out_dir}")
    for path in replaced:
        shutil.rmtree(path, ignore_errors=True)
        click.echo(f"removed {path}: the converted weight store of the model this one replaces")


def _converted_copies(model_dir: Path) -> list[Path]:
    """The weight stores under $FLEXJOB_HOME/weights converted from the model now in `model_dir`
    (fp16 and compressed); they are keyed by its fingerprint, so a new model there never uses them."""
    from engine.model.checkpoint import checkpoint_fingerprint
    from engine.runtime.paths import engine_home

    if not (model_dir / "config.json").is_file():
        return []
    fingerprint = checkpoint_fingerprint(model_dir)
    weights = engine_home() / "weights"
    return sorted(p for p in weights.glob(f"{fingerprint}*") if p.is_dir()) if weights.is_dir() else []


def policy_options(f):
    """The FlexGen policy flags shared by `generate` and `work`."""
    options = [
        click.option("--percent", type=float, nargs=6, default=None,
                     help="Six numbers: weights GPU CPU, KV cache GPU CPU, activations GPU CPU (the rest of "
                          "each goes to disk). Without a GPU the GPU share is RAM. Omit to let the planner choose."),
        click.option("--gpu-batch-size", type=int, default=None, help="Rows per micro-batch."),
        click.option("--num-gpu-batches", type=int, default=None, help="Micro-batches per block."),
        click.option("--gpu-mem", type=float, default=None, help="GPU memory budget in GiB."),
        click.option("--cpu-mem", type=float, default=None, help="CPU memory budget in GiB (whole process RSS)."),
        click.option("--offload-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Disk tier directory (weight store, spilled cache). Default: $FLEXJOB_HOME, else the user data directory"),
        click.option("--overlap/--no-overlap", default=True, show_default=True,
                     help="Overlap I/O with compute."),
        click.option("--cpu-cache-compute", is_flag=True, help="Compute attention on the CPU where the cache lives."),
        click.option("--compress-weight", is_flag=True, help="4-bit group-wise compressed weights."),
        click.option("--compress-cache", is_flag=True, help="4-bit group-wise compressed KV cache."),
        click.option("--compress-bits", type=int, default=4, show_default=True),
        click.option("--compress-group-size", type=int, default=64, show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def build_policy(percent, gpu_batch_size, num_gpu_batches, overlap, cpu_cache_compute, compress_weight,
                 compress_cache, compress_bits, compress_group_size, *, command: str = "generate"):
    """The Policy the flags describe; a bad value is refused with the help of the `command` used."""
    from engine.errors import PolicyError
    from engine.runtime.policy import CompressionConfig, Policy
    from jobrunner.errors import UserError

    kwargs = dict(overlap=overlap, cpu_cache_compute=cpu_cache_compute, compress_weight=compress_weight,
                  compress_cache=compress_cache,
                  compression=CompressionConfig(num_bits=compress_bits, group_size=compress_group_size))
    if gpu_batch_size is not None:
        kwargs["gpu_batch_size"] = gpu_batch_size
    if num_gpu_batches is not None:
        kwargs["num_gpu_batches"] = num_gpu_batches
    try:
        return Policy.from_percents(percent if percent else (100, 0, 100, 0, 100, 0), **kwargs)
    except PolicyError as exc:
        raise UserError(str(exc), f"see `flexjob {command} --help` for the policy flags, or omit them to let "
                                  "the planner choose") from None


def default_offload_dir(offload_dir: Path | None) -> Path:
    from engine.runtime.paths import engine_home

    return offload_dir or engine_home()


def host_profile(offload_dir: Path, *, model=None):
    """This host's profile for the planner (with `model`'s compute calibration), measured now,
    once, if none is stored: a few seconds, announced on stderr."""
    from engine.planning.profile_store import profile_path
    from engine.planning.profiler import load_or_measure_profile

    if not profile_path(offload_dir).is_file():
        click.echo("measuring this machine once for the planner (as `flexjob profile` does) ...", err=True)
    return load_or_measure_profile(offload_dir, model=model)


def measure_and_plan(config, offload_dir: Path, gpu_mem, cpu_mem, *, prompt_len: int, gen_len: int,
                     flags: dict | None = None, max_block_size: int | None = None):
    """The LP planner's policy for this host, profiling the host first when it has no stored profile
    (measured once and stored)."""
    from jobrunner.worker.replan import plan_for_this_process

    hardware = host_profile(offload_dir, model=config)
    flags = flags or {}
    result = plan_for_this_process(config, hardware, gpu_mem_gib=gpu_mem, cpu_mem_gib=cpu_mem,
                                   prompt_len=prompt_len, gen_len=gen_len, max_block_size=max_block_size,
                                   allow_compression=bool(flags.get("compress_weight") or
                                                          flags.get("compress_cache")))
    click.echo(f"planner: {result.policy.describe()} (predicted {result.tokens_per_s:.2f} tokens/s)", err=True)
    return result.policy


@main.command("generate")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model directory (OPT, Llama, Mistral, Qwen2).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--max-input-length", type=int, default=None, help="Cut prompts to their last N tokens.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Compute dtype. Default: float16 on CUDA; bfloat16 on CPUs with native bf16 "
                   "(AVX512-BF16/AMX), else float32.")
@policy_options
def generate_command(model_dir, prompts, max_new_tokens, max_input_length, temperature, top_p, seed, dtype,
                     percent, gpu_batch_size, num_gpu_batches, gpu_mem, cpu_mem, offload_dir, overlap,
                     cpu_cache_compute, compress_weight, compress_cache, compress_bits, compress_group_size):
    """Generate for one or more prompts with an explicit offloading policy (FlexGen's demo flags).

    \b
    Example:
      flexjob generate --model models/opt-1.3b --prompt "Paris is the capital of" \\
          --percent 0 50 100 0 100 0 --gpu-batch-size 8 --cpu-mem 4
    """
    from transformers import AutoTokenizer

    from engine.planning.profile_store import learn_from_blocks
    from engine.runtime.engine import Engine, check_lengths
    from engine.model.config import load_config
    from engine.runtime.rows import GenerationParams, RowInput

    config = load_config(model_dir)  # fail fast with a clear message before anything heavy
    offload_dir = default_offload_dir(offload_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    for i, text in enumerate(prompts):
        ids = tokenizer(text, verbose=False).input_ids
        if max_input_length is not None:
            ids = ids[:1] + ids[1:][-(max_input_length - 1):] if max_input_length > 1 else ids[:1]
        rows.append(RowInput(row_id=i, prompt_ids=tuple(ids)))
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    check_lengths(config, rows, params)
    if percent is None and gpu_batch_size is None and num_gpu_batches is None:
        policy = measure_and_plan(config, offload_dir, gpu_mem, cpu_mem,
                                  prompt_len=max(len(r.prompt_ids) for r in rows), gen_len=max_new_tokens,
                                  max_block_size=len(rows),
                                  flags=dict(compress_weight=compress_weight, compress_cache=compress_cache))
    else:
        policy = build_policy(percent, gpu_batch_size, num_gpu_batches, overlap, cpu_cache_compute,
                              compress_weight, compress_cache, compress_bits, compress_group_size)
    with Engine(model_dir, policy, dtype=dtype, offload_dir=offload_dir, gpu_mem_gib=gpu_mem,
                cpu_mem_gib=cpu_mem, tokenizer=tokenizer) as engine:
        results = engine.generate(rows, params)
        learn_from_blocks(offload_dir, engine.stats.blocks)  # the stored profile learns this disk
        for text, res in zip(prompts, results):
            click.echo(text + engine.tokenizer.decode(res.generated_ids, skip_special_tokens=True))
            click.echo("-" * 40)
        s = engine.stats
        click.echo(f"policy: {policy.describe()}  dtype: {str(engine.dtype).removeprefix('torch.')}  "
                   f"device: {engine.device}")
        click.echo(f"prefill: {s.prefill_tokens_per_s:.1f} tokens/s  decode: {s.decode_tokens_per_s:.1f} tokens/s  "
                   f"overall: {s.tokens_per_s:.2f} generated tokens/s")
        gpu = f"  peak GPU: {s.peak_gpu_bytes / 2**30:.2f} GiB" if engine.device.type == "cuda" else ""
        click.echo(f"peak RSS: {s.peak_rss_bytes / 2**30:.2f} GiB{gpu}  weights per tier (GiB): " +
                   ", ".join(f"{t.value} {b / 2**30:.2f}" for t, b in engine.weights.bytes_by_tier().items()))
