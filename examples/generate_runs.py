"""What the FlexGen tutorial examples share: a model on disk, one `flexjob generate` per process, charts.

Not an example itself. `run_generate` starts `flexjob generate` as a child process and reads its
peak RSS from the kernel (`os.wait4`'s ru_maxrss: the child's own high-water mark, not a sample),
so each policy is measured in a fresh process, as FlexGen's tutorial does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

GIB = 1024 ** 3
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"   # git-ignored
# A prompt of ordinary words; `--max-input-length` cuts it to the requested number of tokens.
PROMPT_WORDS = "Paris is the capital city of France and one of the oldest cities of Europe".split()


def prompt_of(tokens: int) -> str:
    """A prompt at least `tokens` tokens long (the byte-level tokenizer gives >= 1 token per word)."""
    return " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(tokens))


def ensure_model(size: str, path: Path, *, layers: int | None = None) -> Path:
    """`flexjob make-model SIZE -o PATH` unless PATH holds a model; under /work/models-style sharing,
    a lock file beside it keeps two writers apart."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "jobrunner.cli", "make-model", size, "-o", str(path)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    lock = path.parent / ".lock"
    subprocess.run(["flock", str(lock), "sh", "-c", 'test -e "$0/config.json" || exec "$@"', str(path), *cmd],
                   check=True, capture_output=True, text=True)
    return path


def run_child(cmd: list[str]) -> dict:
    """Run `cmd` as a child; its exit code, stdout, stderr, wall time and peak RSS (GiB, ru_maxrss).
    Output goes to temporary files so that the parent can reap the child itself with os.wait4."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        return {"returncode": proc.returncode, "stdout": out.read(), "stderr": err.read(),
                "wall_s": round(time.perf_counter() - start, 2),
                "peak_rss_gib": round(usage.ru_maxrss / 1024 ** 2, 3)}   # ru_maxrss is in KiB on Linux


def generate_cmd(model: Path, *, percent: str | None, batch: int, prompt_len: int, gen_len: int,
                 offload_dir: Path, cpu_mem: float | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The `flexjob generate` command line for one run (batch rows of one prompt_len-token prompt)."""
    cmd = [sys.executable, "-m", "jobrunner.cli", "generate", "--model", str(model),
           "--max-new-tokens", str(gen_len), "--max-input-length", str(prompt_len),
           "--gpu-batch-size", str(batch), "--offload-dir", str(offload_dir), *extra]
    if percent is not None:
        cmd += ["--percent", *percent.split()]
    if cpu_mem is not None:
        cmd += ["--cpu-mem", str(cpu_mem)]
    for _ in range(batch):
        cmd += ["--prompt", prompt_of(prompt_len)]
    return cmd


def run_generate(model: Path, **kw) -> dict:
    """One `flexjob generate` run: what it printed, parsed, plus the child's measured peak RSS."""
    r = run_child(generate_cmd(model, **kw))
    row = {"percent": kw.get("percent"), "cpu_mem": kw.get("cpu_mem"), "ok": r["returncode"] == 0,
           "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"]}
    if not row["ok"]:
        lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
        row["error"] = " ".join(lines[-3:]) if lines else f"exit {r['returncode']}"
        return row
    out = r["stdout"]
    number = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    tiers = re.search(r"weights per tier \(GiB\): gpu ([\d.]+), cpu ([\d.]+), disk ([\d.]+)", out)
    row.update(tokens_per_s=number(r"overall: ([\d.]+)"), engine_peak_rss_gib=number(r"peak RSS: ([\d.]+)"),
               policy=re.search(r"policy: (.*?)  dtype", out).group(1),
               weights_gib={"gpu": float(tiers.group(1)), "cpu": float(tiers.group(2)),
                            "disk": float(tiers.group(3))})
    return row


def write_results(out_dir: Path, name: str, data: dict, fig) -> tuple[Path, Path]:
    """`name`.json and `name`.png under out_dir; fig is a matplotlib Figure (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    return json_path, png_path


def machine_line() -> str:
    """CPU count and load average, to print and store beside the figures (timings are noisy)."""
    return f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"


def quick_model(tmp_dir: Path) -> Path:
    """A two-layer opt-125m in tmp_dir, for `--quick` runs that take seconds."""
    return ensure_model("125m", tmp_dir / "opt-125m-2l", layers=2)


def example_parser(doc: str, *, batch: int, gen_len: int) -> argparse.ArgumentParser:
    """The options every example takes: the model (or --quick), the workload, the disk tier, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--quick", action="store_true",
                    help="batch 2, gen 2; without --model, on a two-layer opt-125m made in a temp dir")
    ap.add_argument("--batch", "--gpu-batch-size", dest="batch", type=int, default=batch,
                    help="rows in one micro-batch (one block)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=gen_len)
    ap.add_argument("--offload-dir", type=Path, help="disk tier (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON and PNG go")
    return ap


@contextmanager
def example_model(ap: argparse.ArgumentParser, args: argparse.Namespace):
    """The model to run (for --quick without --model, made in a temp dir), with args.offload_dir set
    and --quick's tiny workload applied; the temp dir goes when the block ends."""
    if not args.quick and args.model is None:
        ap.error("--model is required without --quick")
    with tempfile.TemporaryDirectory() as tmp:
        args.offload_dir = args.offload_dir or Path(tmp) / "offload"
        if args.quick:
            args.batch, args.gen_len = 2, 2
        yield args.model or quick_model(Path(tmp))
