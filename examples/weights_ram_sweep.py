"""Weights' RAM share swept 0-100 % (the rest on disk) on opt-1.3b: tokens/s and peak RSS per point.

    flexjob make-model 1.3b -o /work/models/opt-1.3b
    python examples/weights_ram_sweep.py --model /work/models/opt-1.3b [--plan-cpu-mem 2] [--out DIR]
    python examples/weights_ram_sweep.py --quick       # a two-layer opt-125m, seconds

Every point runs `flexjob generate --percent 0 W 0 100 0 100` (W % of the weights in RAM, the rest
streamed from the page-cache-bypassing disk tier; KV cache and activations in RAM) in its own
process with one fixed block (--gpu-batch-size, one micro-batch), so only the weights' placement
changes. Peak RSS is the child's ru_maxrss. The planner's pick for a RAM budget of --plan-cpu-mem
GiB (`flexjob plan --json`, block capped at the same size) is run too and marked on the chart: it
shows where the LP puts the weights when RAM is short and what that costs in speed.
Writes weights_ram_sweep.json and weights_ram_sweep.png under --out.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from generate_runs import example_model, example_parser, machine_line, run_child, run_generate, write_results

SHARES = (0, 25, 50, 75, 100)


def planner_pick(model: Path, cpu_mem: float, args) -> dict:
    """`flexjob plan --json` for this model, workload and block cap: its policy as generate flags."""
    cmd = [sys.executable, "-m", "jobrunner.cli", "plan", "--model", str(model), "--cpu-mem", str(cpu_mem),
           "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len), "--compression", "off",
           "--max-block-size", str(args.batch), "--offload-dir", str(args.offload_dir), "--json"]
    r = run_child(cmd)
    if r["returncode"] != 0:
        return {"ok": False, "error": r["stderr"].strip()[-300:]}
    plan = json.loads(r["stdout"])
    pol = plan["policy"]
    percent = " ".join(f"{pol[k]:g}" for k in ("weights_gpu_percent", "weights_cpu_percent", "cache_gpu_percent",
                                                 "cache_cpu_percent", "activations_gpu_percent",
                                                 "activations_cpu_percent"))
    return {"ok": True, "percent": percent, "gpu_batch_size": pol["gpu_batch_size"],
            "num_gpu_batches": pol["num_gpu_batches"], "predicted_tokens_per_s": plan["tokens_per_s"],
            "predicted_peak_gib": plan["peak_gib"], "describe": plan["describe"],
            "weights_ram_percent": pol["weights_gpu_percent"] + pol["weights_cpu_percent"]}


def chart(points: list[dict], pick: dict, cpu_mem: float, title: str):
    """tokens/s (left axis) and peak RSS (right axis) against the weights' RAM share; the pick as stars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5))
    speed = fig.add_subplot(1, 1, 1)
    rss = speed.twinx()
    ok = [p for p in points if p["ok"]]
    speed.plot([p["share"] for p in ok], [p["tokens_per_s"] for p in ok], "o-", color="tab:blue", label="tokens/s")
    rss.plot([p["share"] for p in ok], [p["peak_rss_gib"] for p in ok], "s--", color="tab:orange",
             label="peak RSS")
    if pick.get("ok"):
        _mark_pick(speed, rss, pick, cpu_mem)
    speed.set_xlabel("weights in RAM, % (the rest streamed from disk)")
    speed.set_ylabel("generated tokens/s", color="tab:blue")
    rss.set_ylabel("peak RSS, GiB", color="tab:orange")
    picked = [r for r in (pick.get("run", {}), pick.get("run_uncapped", {})) if r.get("ok")]
    speed.set_ylim(0, 1.3 * max([p.get("tokens_per_s", 0) for p in points + picked] + [0.01]))
    rss.set_ylim(0, 1.3 * max([p["peak_rss_gib"] for p in points + picked] + [cpu_mem]))
    lines = speed.get_legend_handles_labels()[0] + rss.get_legend_handles_labels()[0]
    speed.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    speed.set_title(title, fontsize=9)
    return fig


def _mark_pick(speed, rss, pick: dict, cpu_mem: float) -> None:
    """The planner's pick: a vertical line at its weights' RAM share, its measured run as stars
    (measured without the budget when the engine refused it under the budget), and the budget."""
    x = pick["weights_ram_percent"]
    speed.axvline(x, color="gray", linestyle=":")
    run = pick.get("run", {})
    measured = run if run.get("ok") else pick.get("run_uncapped", {})
    if measured.get("ok"):
        speed.plot([x], [measured["tokens_per_s"]], "*", color="tab:blue", markersize=16,
                   label="planner's pick, measured" + ("" if run.get("ok") else " without the budget"))
        rss.plot([x], [measured["peak_rss_gib"]], "*", color="tab:orange", markersize=16)
    refusal = ("" if run.get("ok", True) else "\nrefused under the budget: " +
               (re.search(r"needs [\d.]+ GiB", run["error"]) or re.search(".{0,40}", run["error"])).group(0))
    speed.annotate(f"planner, --cpu-mem {cpu_mem:g}:\n{x:.0f} % of weights in RAM\n"
                   f"predicted {pick['predicted_tokens_per_s']:.2f} tokens/s{refusal}", (x, 0),
                   xytext=(-5 if x > 50 else 5, 10), textcoords="offset points", fontsize=8,
                   ha="right" if x > 50 else "left")
    rss.axhline(cpu_mem, color="tab:orange", linestyle=":", linewidth=1, label=f"{cpu_mem:g} GiB budget")


def main() -> None:
    ap = example_parser(__doc__, batch=8, gen_len=8)
    ap.add_argument("--plan-cpu-mem", type=float, default=2.0, help="RAM budget (GiB) for the planner's pick")
    args = ap.parse_args()
    with example_model(ap, args) as model:
        run = dict(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, offload_dir=args.offload_dir)
        points, pick = [], {}
        print(f"{'weights in RAM %':<18}{'tokens/s':>10}{'peak RSS GiB':>14}")
        for share in SHARES:
            p = {"share": share, **run_generate(model, percent=f"0 {share} 0 100 0 100", **run)}
            points.append(p)
            print(f"{share:<18}{p.get('tokens_per_s', float('nan')):>10.2f}{p['peak_rss_gib']:>14.2f}  "
                  f"{p.get('error', '')}", flush=True)
            save(args, model, points, pick)   # after every point: a run cut short still leaves its figures
        pick = planner_pick(model, args.plan_cpu_mem, args)
        if pick["ok"]:
            extra = ("--num-gpu-batches", str(pick["num_gpu_batches"]))
            pick_run = dict(model=model, percent=pick["percent"], **{**run, "batch": pick["gpu_batch_size"]}, extra=extra)
            pick["run"] = run_generate(cpu_mem=args.plan_cpu_mem, **pick_run)
            if not pick["run"]["ok"]:   # refused under the budget: measure what it takes without one
                pick["run_uncapped"] = run_generate(**pick_run)
            print(f"planner (--cpu-mem {args.plan_cpu_mem:g}): {pick['describe']} -> "
                  f"{pick['run'].get('tokens_per_s', pick['run'].get('error'))} tokens/s, "
                  f"peak RSS {pick['run']['peak_rss_gib']:.2f} GiB", flush=True)
        else:
            print(f"planner: {pick['error']}")
        print(machine_line())
        for path in save(args, model, points, pick):
            print(f"wrote {path}")


def save(args, model: Path, points: list[dict], pick: dict) -> tuple[Path, Path]:
    load = machine_line()
    data = {"model": model.name, "batch": args.batch, "prompt_len": args.prompt_len, "gen_len": args.gen_len,
            "plan_cpu_mem_gib": args.plan_cpu_mem, "machine": load, "points": points, "planner": pick}
    title = (f"{model.name}: weights' RAM share, block {args.batch}, prompt {args.prompt_len}, gen {args.gen_len} "
             f"({load})")
    return write_results(args.out, "weights_ram_sweep", data, chart(points, pick, args.plan_cpu_mem, title))


if __name__ == "__main__":
    main()
