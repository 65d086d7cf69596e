"""opt-6.7b (13 GB of fp16 weights) generating under a 4 GiB RAM cap, where loading it whole fails.

    flexjob make-model 6.7b -o /work/models/opt-6.7b      # once, ~13 GB of random weights
    python examples/opt67b_cpu_mem_cap.py --model /work/models/opt-6.7b [--percent "0 10 0 100 0 100"] [--out DIR]
    python examples/opt67b_cpu_mem_cap.py --quick          # a two-layer opt-125m, seconds

Three runs, each in its own process, against the same cap (--cap-gib, default 4):
1. transformers `AutoModelForCausalLM.from_pretrained(..., dtype=bfloat16)` under a user-space RSS
   cap (examples/rss_watchdog.py): killed when its anonymous RSS passes the cap. The cap is
   enforced by sampling /proc, not by the kernel (no cgroup is created; RLIMIT_AS is no RSS cap).
2. `flexjob generate --percent 100 0 100 0 100 0 --cpu-mem CAP` (every weight in RAM): the engine
   refuses before loading, naming the memory it would need.
3. `flexjob generate --cpu-mem CAP` with most weights streamed from the disk tier (--percent, or the
   planner's choice with --percent ""): runs to completion; its peak RSS is the child's ru_maxrss.
Writes cpu_mem_cap.json and cpu_mem_cap.png (peak RSS per run against the cap) under --out.
Batch 4, prompt 32, gen 8 by default: minutes on two cores, most of it reading weights from disk.
On a fresh --offload-dir the streamed run first converts the checkpoint into the weight store
(minutes more; that run's peak RSS is the conversion's): pass the same --offload-dir again to
measure the generation alone.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from generate_runs import example_model, example_parser, machine_line, run_generate, write_results
from rss_watchdog import run_capped

HF_LOAD = ("import sys, torch, transformers\n"
           "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
           "print('loaded', sum(p.numel() for p in m.parameters()), 'parameters')\n")


def transformers_load(model: Path, cap_gib: float) -> dict:
    r = run_capped([sys.executable, "-c", HF_LOAD, str(model)], cap_gib)
    ok = r["returncode"] == 0
    outcome = ("loaded" if ok else f"killed at the cap after {r['wall_s']:.0f} s\n"
               f"(anonymous {r['peak_rss_anon_gib']:.2f} GiB, VmRSS {r['peak_vmrss_gib']:.2f} GiB)"
               if r["killed"] == "cap"
               else f"failed ({r['killed'] or 'exit ' + str(r['returncode'])})")
    return {"run": "transformers from_pretrained (bf16)", "ok": ok, "outcome": outcome,
            "peak_rss_gib": r["peak_rss_anon_gib"], **r}


def engine_run(model: Path, percent: str | None, cap_gib: float, args, name: str) -> dict:
    r = run_generate(model, percent=percent, cpu_mem=cap_gib, batch=args.batch, prompt_len=args.prompt_len,
                     gen_len=args.gen_len, offload_dir=args.offload_dir)
    needs = None if r["ok"] else re.search(r"needs ([\d.]+ GiB)", r["error"])
    outcome = (f"completed, {r['tokens_per_s']:.2f} tokens/s" if r["ok"]
               else f"refused before loading: needs {needs.group(1)}" if needs else "failed: " + r["error"][-120:])
    return {"run": name, "outcome": outcome, **r}


def chart(rows: list[dict], cap_gib: float, title: str):
    """One bar per run: its peak RSS against the cap, coloured by how it ended."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5))
    ax = fig.add_subplot(1, 1, 1)
    colours = ["tab:green" if r["ok"] else "tab:red" for r in rows]
    bars = ax.bar(range(len(rows)), [r["peak_rss_gib"] for r in rows], color=colours)
    ax.axhline(cap_gib, color="black", linestyle="--", label=f"cap {cap_gib:g} GiB")
    for bar, r in zip(bars, rows):
        text = r["outcome"] if len(r["outcome"]) < 90 else r["outcome"][:87] + "..."
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.05, text, ha="center", va="bottom",
                fontsize=7, wrap=True)
    ax.set_xticks(range(len(rows)), [r["run"] for r in rows], fontsize=8)
    ax.set_ylabel("peak RSS, GiB")
    ax.set_ylim(0, max(cap_gib, *[r["peak_rss_gib"] for r in rows]) * 1.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.text(0.01, 0.01, "transformers: anonymous RSS sampled from /proc, killed past the cap (user-space cap); "
             "flexjob: the child's ru_maxrss", fontsize=7)
    return fig


def main() -> None:
    ap = example_parser(__doc__, batch=4, gen_len=8)
    ap.add_argument("--cap-gib", type=float, default=4.0)
    ap.add_argument("--percent", default="0 10 0 100 0 100", help='the streamed run\'s policy; "" = the planner\'s')
    args = ap.parse_args()
    with example_model(ap, args) as model:
        percent = args.percent or None
        rows = [transformers_load(model, args.cap_gib),
                engine_run(model, "100 0 100 0 100 0", args.cap_gib, args, "flexjob, every weight in RAM"),
                engine_run(model, percent, args.cap_gib, args, f"flexjob --percent {percent or '(planner)'}")]
    for r in rows:
        print(f"{r['run']:<44} peak RSS {r['peak_rss_gib']:6.2f} GiB  {r['outcome']}", flush=True)
    load = machine_line()
    print(load)
    data = {"model": model.name, "cap_gib": args.cap_gib, "batch": args.batch, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "machine": load, "runs": rows}
    title = (f"{model.name} under a {args.cap_gib:g} GiB RAM cap: batch {args.batch}, prompt {args.prompt_len}, "
             f"gen {args.gen_len} ({load})")
    for path in write_results(args.out, "cpu_mem_cap", data, chart(rows, args.cap_gib, title)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
