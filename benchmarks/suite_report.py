"""The suite's outputs: suite-<date>.md (one table per part, with the host's CPU flags, the dtype and
the command line), suite-<date>.json (the same rows, machine-readable) and PNG plots (tokens/s of
flexjob against its baselines, roofline fraction, planner's pick against hand-written policies)."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.suite_parts import Part

BASELINES = ("transformers", "transformers+accelerate", "FlexLLMGen")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value).replace("|", "/")[:120]


def part_summary(part: Part) -> dict[str, float]:
    """The ratios the targets are stated in, all measured within the part: best flexjob over best
    baseline, the planner's pick over the best hand-written policy, 4-bit over 16-bit weights."""
    def best(pick) -> float:
        return max((r["tokens_per_s"] for r in part.rows if r.get("tokens_per_s") and pick(r)), default=0.0)

    ours = best(lambda r: r.get("system") in ("flexjob", "planner"))
    baseline = best(lambda r: r.get("system") in BASELINES)
    hand = best(lambda r: r.get("system") == "hand-written")
    packed, plain = best(lambda r: r.get("compress_weight") is True), best(lambda r: r.get("compress_weight") is False)
    summary = {"4-bit / 16-bit weights": packed / plain} if packed and plain else {}
    if ours and baseline:
        summary["best flexjob / best baseline"] = ours / baseline
    # Over capacity, a baseline counts only under the same memory limit as flexjob's runs (a run
    # without one reads its "offloaded" weights back from the page cache).
    limited = best(lambda r: r.get("system") in BASELINES
                   and not str(r.get("memory_limit", "none")).startswith("none"))
    if ours and limited:
        summary["best flexjob / best baseline under the same memory limit"] = ours / limited
    if ours and hand:
        summary["planner / best hand-written"] = ours / hand
    return summary


def part_table(part: Part) -> str:
    """One markdown section: title, then a table, or the reason the part did not run."""
    lines = [f"## {part.title}", ""]
    if part.skipped or part.error:
        return "\n".join(lines + [f"Skipped: {part.skipped}" if part.skipped else f"Failed: {part.error}", ""])
    headers = ["system", "configuration", "tokens/s", *(h for _, h in part.columns)]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in part.rows:
        tps = row.get("tokens_per_s")
        cells = [row.get("system", ""), row.get("config", ""),
                 f"{tps:.2f}" if tps else f"error: {row.get('error', '?')}"[:80]]
        cells += [_cell(row.get(key)) for key, _ in part.columns]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    ratios = "".join(f" {name}: {value:.2f}x." for name, value in part_summary(part).items())
    return "\n".join(lines + ["", f"{len(part.rows)} runs, {part.seconds:.0f} s.{ratios}", ""])


def write_markdown(path: Path, parts: list[Part], meta: dict) -> None:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in meta["host"]["flags"].items())
    head = [f"# Benchmark suite `{meta['suite']}`, {meta['date']}", "",
            f"- command: `{meta['command']}`",
            f"- host: {meta['host']['host']}, {meta['host']['cpu']}, {meta['host']['cores']} cores",
            f"- CPU flags: {flags}",
            f"- dtype: {meta['dtype']}; model: {meta['model']} (random weights, real dimensions)",
            f"- total: {meta['seconds']:.0f} s", ""]
    path.write_text("\n".join(head + [part_table(p) for p in parts]))


def write_json(path: Path, parts: list[Part], meta: dict) -> None:
    payload = {**meta, "parts": {p.name: {"title": p.title, "rows": p.rows, "skipped": p.skipped,
                                          "error": p.error, "seconds": p.seconds, "summary": part_summary(p),
                                          "columns": p.columns}
                          for p in parts},
               "rows": [{"part": p.name, **r} for p in parts for r in p.rows]}
    path.write_text(json.dumps(payload, indent=1, default=str))


def parts_from_json(payload: dict) -> list[Part]:
    """The parts of a report that write_json wrote; titles name the dtype they ran in."""
    return [Part(name, f"{p['title']}, {payload['dtype']}", p["rows"], tuple(tuple(c) for c in p["columns"]), p["skipped"], p["error"],
                 p["seconds"]) for name, p in payload["parts"].items()]


def write_plots(stem: Path, parts: list[Part]) -> list[Path]:
    """Three PNGs next to the markdown; a plot whose part did not run says so on its canvas."""
    import matplotlib

    matplotlib.use("Agg")
    by_name = {p.name: p for p in parts}
    plots = [(stem.with_name(stem.name + "-tokens.png"), _plot_tokens, [by_name.get(n) for n in
                                                                       ("ram", "disk", "llama-ram",
                                                                        "llama-disk", "flexgen")]),
             (stem.with_name(stem.name + "-roofline.png"), _plot_roofline,
              [by_name.get("disk"), by_name.get("llama-disk")]),
             (stem.with_name(stem.name + "-planner.png"), _plot_planner, [by_name.get("planner")])]
    for path, draw, chosen in plots:
        _save(path, draw, [p for p in chosen if p is not None and p.rows])
    return [path for path, _, _ in plots]


def _save(path: Path, draw, parts: list[Part]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    if parts:
        draw(ax, parts)
    else:
        ax.text(0.5, 0.5, "not run in this suite", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(ax, labels: list[str], values: list[float], colors: list[str]) -> None:
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()


def _plot_tokens(ax, parts: list[Part]) -> None:
    rows = [(p.name, r) for p in parts for r in p.rows if r.get("tokens_per_s")]
    _bars(ax, [f"{name}: {r['system']} {r['config']}"[:60] for name, r in rows], [r["tokens_per_s"] for _, r in rows],
          ["tab:gray" if r["system"] in BASELINES else "tab:blue" for _, r in rows])
    ax.set_xlabel("generated tokens/s (prefill included); blue: flexjob, gray: baseline")
    ax.set_title("flexjob vs transformers (in RAM) and accelerate (over capacity)")


def _plot_roofline(ax, parts: list[Part]) -> None:
    named = [(p.name, r) for p in parts for r in p.rows if r.get("roofline_fraction")]
    rows = [r for _, r in named]
    _bars(ax, [f"{name}: {r['config']}"[:60] for name, r in named], [r["roofline_fraction"] for r in rows],
          ["tab:blue"] * len(rows))
    ax.axvline(0.8, color="tab:red", linestyle="--", label="80 % target over capacity")
    ax.axvline(0.85, color="tab:green", linestyle=":", label="85 % goal in RAM")
    ax.set_xlim(0, max([1.0, *(r["roofline_fraction"] for r in rows)]))
    ax.set_xlabel("roofline time / measured time (per step: max(bytes / bandwidth, FLOPs / FLOP/s))")
    ax.set_title("Fraction of the roofline reached (ram: weights from RAM; disk: from the disk)")
    ax.legend()


def _plot_planner(ax, parts: list[Part]) -> None:
    rows = parts[0].rows
    labels = [r["config"][:60] for r in rows]
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r.get("tokens_per_s") or 0 for r in rows], height=0.4,
            color=["tab:orange" if r["system"] == "planner" else "tab:blue" for r in rows], label="measured")
    ax.barh([y + 0.2 for y in ys], [r.get("predicted_tokens_per_s") or 0 for r in rows], height=0.4,
            color="tab:gray", label="predicted")
    ax.set_yticks(list(ys), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (orange: the planner's pick)")
    ax.set_title("Planner's pick vs hand-written policies, measured and predicted")
    ax.legend()
