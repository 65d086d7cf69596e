"""FlexGen's tutorial experiment: memory vs speed for five placements of opt-1.3b.

    python examples/flexgen_tutorial_policies.py --model /work/models/opt-1.3b [--gen-len 32] [--out DIR]
    python examples/flexgen_tutorial_policies.py --quick       # a two-layer opt-125m, seconds

Runs each of the tutorial's `--percent` policies through `flexjob generate` in its own process and
prints the peak memory per tier and the throughput of each; writes tutorial_policies.json and
tutorial_policies.png (per policy: peak RSS and weights per tier, GiB, beside tokens/s) under --out.
Peak RSS is the child's kernel high-water mark (ru_maxrss). Without a GPU the "GPU" share is RAM
(the compute device's memory), so the first and third policies differ from the others only in
where the KV cache and activations live; the disk share is a real, page-cache-bypassing disk tier.
(Create the model first: `flexjob make-model 1.3b -o /work/models/opt-1.3b`.)
"""
from __future__ import annotations

from pathlib import Path

from generate_runs import example_model, example_parser, machine_line, run_generate, write_results

TUTORIAL_POLICIES = [
    "100 0 100 0 100 0",   # everything on the GPU
    "10 90 0 100 0 100",   # weights mostly on CPU, cache and activations on CPU
    "90 10 100 0 100 0",
    "5 95 0 100 0 100",
    "70 30 0 100 0 100",
]


def chart(rows: list[dict], title: str):
    """Left: peak RSS (measured) and weights per tier for each policy; right: tokens/s."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    mem, speed = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = [r["percent"] for r in rows]
    x = range(len(rows))
    series = [("peak RSS (RAM)", lambda r: r["peak_rss_gib"]),
              ("weights on GPU", lambda r: r["weights_gib"]["gpu"]),
              ("weights in RAM", lambda r: r["weights_gib"]["cpu"]),
              ("weights on disk", lambda r: r["weights_gib"]["disk"])]
    width = 0.8 / len(series)
    for i, (name, value) in enumerate(series):
        mem.bar([k + (i - 1.5) * width for k in x], [value(r) if r["ok"] else 0 for r in rows], width, label=name)
    speed.bar(list(x), [r.get("tokens_per_s", 0) for r in rows], color="tab:green")
    for ax, ylabel in ((mem, "GiB"), (speed, "generated tokens/s")):
        ax.set_xticks(list(x), labels, rotation=25, fontsize=8)
        ax.set_xlabel("--percent (weights, cache, activations: GPU CPU)")
        ax.set_ylabel(ylabel)
    for k, r in enumerate(rows):
        if not r["ok"]:
            speed.text(k, 0, "failed", ha="center", va="bottom", color="red")
    mem.set_ylim(0, 1.35 * max([r["peak_rss_gib"] for r in rows] + [0.1]))
    mem.legend(fontsize=8, ncol=2, loc="upper center")
    mem.set_title("peak memory per tier")
    speed.set_title("throughput")
    fig.suptitle(title, fontsize=10)
    return fig


def main() -> None:
    ap = example_parser(__doc__, batch=4, gen_len=32)
    args = ap.parse_args()
    with example_model(ap, args) as model:
        prompt_len, gen_len, batch, offload = args.prompt_len, args.gen_len, args.batch, args.offload_dir
        print(f"{'--percent':<22}{'tokens/s':>10}{'peak RSS GiB':>14}  weights per tier (GiB)")
        rows = []
        for percent in TUTORIAL_POLICIES:
            r = run_generate(model, percent=percent, batch=batch, prompt_len=prompt_len,
                             gen_len=gen_len, offload_dir=offload)
            rows.append(r)
            if r["ok"]:
                tiers = ", ".join(f"{k} {v:.2f}" for k, v in r["weights_gib"].items())
                print(f"{percent:<22}{r['tokens_per_s']:>10.2f}{r['peak_rss_gib']:>14.2f}  {tiers}", flush=True)
            else:
                print(f"{percent:<22}  failed: {r['error']}", flush=True)
            paths = save(rows, model.name, prompt_len, gen_len, batch, args.out)  # a cut run keeps its rows
    print(machine_line())
    for path in paths:
        print(f"wrote {path}")


def save(rows: list[dict], model: str, prompt_len: int, gen_len: int, batch: int, out: Path) -> tuple[Path, Path]:
    load = machine_line()
    data = {"model": model, "prompt_len": prompt_len, "gen_len": gen_len, "gpu_batch_size": batch,
            "machine": load, "policies": rows}
    title = f"{model}: FlexGen tutorial policies, batch {batch}, prompt {prompt_len}, gen {gen_len} ({load})"
    return write_results(out, "tutorial_policies", data, chart(rows, title))


if __name__ == "__main__":
    main()
