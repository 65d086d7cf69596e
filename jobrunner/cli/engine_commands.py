"""Engine commands: `make-model` (random-weight OPT) and `generate` (one prompt, FlexGen's flags)."""
from __future__ import annotations

from pathlib import Path

import click

from jobrunner.cli import main


@main.command("make-model")
@click.argument("size")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the model into (created).")
@click.option("--layers", type=int, default=None, help="Keep only this many decoder layers (fast tests).")
@click.option("--hidden", type=int, default=None, help="Shrink the hidden size (heads = hidden/64).")
@click.option("--heads", type=int, default=None, help="Number of attention heads.")
@click.option("--seed", type=int, default=0, show_default=True)
def make_model_command(size: str, out_dir: Path, layers: int | None, hidden: int | None,
                       heads: int | None, seed: int) -> None:
    """Write a random-weight OPT model of a published SIZE (125m ... 175b, or tiny) plus an offline
    tokenizer, as a Hugging Face model directory.

    \b
    Example:
      flexjob make-model 1.3b -o models/opt-1.3b
      flexjob make-model 125m --layers 2 -o models/test
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from engine.model_config import preset
    from engine.model_maker import make_model

    cfg = preset(size, num_layers=layers, hidden_size=hidden, num_heads=heads)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  transient=True) as progress:
        task = progress.add_task(f"writing {cfg.name}", total=None)
        make_model(cfg, out_dir, seed=seed,
                   on_tensor=lambda _n, done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote {cfg.name} ({cfg.param_count() / 1e9:.3f}B parameters, {cfg.num_layers} layers) "
               f"to {out_dir}")
