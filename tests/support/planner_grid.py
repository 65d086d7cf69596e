"""Brute-force policy search over the same cost model as the LP (engine.planning.planner), to check it in
tests and benchmarks: the cache and activation fractions on a zooming grid, the weights filled
into each tier's budget for every grid point."""
from __future__ import annotations

import itertools

import numpy as np

from engine.planning.cost_inputs import GIB, Placement, Shape, max_weights_disk_fraction, weight_shares
from engine.planning.cost_memory import memory_peaks, peak_bytes
from engine.planning.hardware import HardwareProfile
from engine.model.config import OPTConfig
from engine.planning.planner import FRACTIONS, budgets_bytes, shapes


def grid_search(cfg: OPTConfig, hw: HardwareProfile, sh: Shape, budgets_gib: dict[str, float | None], *,
                step: float = 0.1, levels: int = 12, keep: int = 4, samples: int = 2000,
                seed: int = 0, exact: bool = False) -> tuple[float, Placement] | None:
    """Brute force over the same cost model, for tests. The cache and activation fractions are
    searched on a grid (numpy, vectorised), zoomed around the best few points level by level
    with grid and random offsets. Weights need no grid axis: more of them nearer the compute
    device never costs time or working memory, so for each grid point they fill the GPU budget
    first and then the CPU budget (found by evaluating the cost model's peaks at two points; they
    are affine in each fraction). Without that, the grid stalls where two kinds trade one binding
    budget in a ratio no grid direction follows."""
    free = ["cc", "hc"] if not hw.has_gpu else ["cg", "cc", "hg", "hc"]
    rng = np.random.default_rng(seed)
    axis = np.round(np.arange(0, 1 + 1e-9, step), 12)
    pts = np.array(list(itertools.product(axis, repeat=len(free))), dtype=float)
    best = _grid_eval(cfg, hw, sh, budgets_gib, free, pts, keep, exact)
    h = step
    for _ in range(levels):
        if not best:
            return None
        h /= 2
        offs = np.concatenate([np.array(list(itertools.product((-2 * h, -h, 0.0, h, 2 * h), repeat=len(free)))),
                               rng.uniform(-2 * h, 2 * h, size=(samples, len(free)))])
        pts = np.clip(np.concatenate([p + offs for _, p in best]), 0.0, 1.0)
        found = _grid_eval(cfg, hw, sh, budgets_gib, free, pts, keep, exact)
        best = sorted(found + best, key=lambda tp: tp[0])[:keep] if found else best
    if not best:
        return None
    t, p = best[0]
    x = _filled(cfg, hw, sh, budgets_gib, free, p[None, :])
    return t, Placement(**{k: float(np.asarray(getattr(x, k)).reshape(-1)[0]) for k in FRACTIONS})


def _with(x: Placement, **changes) -> Placement:
    return Placement(**{**{k: getattr(x, k) for k in FRACTIONS}, **changes})


def _fill_limit(cfg, hw, sh, tier: str, limit: float | None, x0: Placement, x1: Placement, hi) -> np.ndarray:
    """Largest t in [0, hi] with every peak candidate of `tier` at x0 + t (x1 - x0) within limit
    (-inf where none fits). Each candidate is affine in t between the knots where wd passes the
    lookup tables' or the head's share (cost_model.weight_split), with steps at knots and at wd = 0
    in the exact model: solved per piece, from t = 0 up."""
    hi = np.asarray(hi, dtype=float)
    if limit is None:
        return hi
    lim = limit * GIB * (1 + 1e-12)
    wd0, wd1 = np.asarray(x0.wd, dtype=float), np.asarray(x1.wd, dtype=float)
    knots = [np.zeros_like(hi), hi]
    with np.errstate(divide="ignore", invalid="ignore"):
        for share in (weight_shares(cfg)[0], max_weights_disk_fraction(cfg)):
            knots.append(np.clip(np.nan_to_num((share - wd0) / (wd1 - wd0), nan=0.0, posinf=0.0, neginf=0.0), 0.0, hi))
    knots = np.sort(np.broadcast_arrays(*knots), axis=0)

    def peaks(t: np.ndarray) -> list[np.ndarray]:
        x = Placement(**{k: getattr(x0, k) + t * (getattr(x1, k) - getattr(x0, k)) for k in FRACTIONS})
        return [np.broadcast_to(np.asarray(p, dtype=float), hi.shape) for p in memory_peaks(cfg, hw, sh, x)[tier]]

    def fits(t: np.ndarray) -> np.ndarray:
        return np.logical_and.reduce([p <= lim for p in peaks(t)])

    out = np.where(fits(knots[0]), np.nan, -np.inf)  # nan: not settled yet
    for a, b in zip(knots[:-1], knots[1:]):
        span = b - a
        a_in, b_in = a + 1e-9 * span, b - 1e-9 * span  # inside the piece, off its steps
        crossing = np.full_like(hi, np.inf)
        for pa, pb in zip(peaks(a_in), peaks(b_in)):
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(pa > lim, a, np.where(pb > lim, a_in + (lim - pa) / (pb - pa) * (b_in - a_in), np.inf))
            crossing = np.minimum(crossing, t)
        settle = np.isnan(out) & np.isfinite(crossing)
        out = np.where(settle, np.maximum(a, crossing), out)
        out = np.where(np.isnan(out) & ~fits(b), b_in, out)  # a step up at b
    return np.where(np.isnan(out), hi, out)


def _filled(cfg, hw, sh, budgets_gib, free, pts) -> Placement:
    vals = {k: np.zeros(len(pts)) for k in FRACTIONS}
    for i, k in enumerate(free):
        vals[k] = pts[:, i]
    for kind in "ch":
        vals[kind + "d"] = 1.0 - vals[kind + "g"] - vals[kind + "c"]
    n = len(pts)
    x = Placement(**{**vals, "wg": np.zeros(n), "wc": np.zeros(n), "wd": np.ones(n)})
    wg = np.zeros(n)
    if hw.has_gpu:
        t = _fill_limit(cfg, hw, sh, "gpu", budgets_gib.get("gpu"), x,
                        _with(x, wg=np.ones(n), wd=np.zeros(n)), np.ones(n))
        wg = np.clip(t, 0.0, 1.0)
        wg = np.where(t < 0, np.nan, wg)  # nothing fits on the GPU even without weights
        x = _with(x, wg=wg, wd=1.0 - wg)
    t = _fill_limit(cfg, hw, sh, "cpu", budgets_gib.get("cpu"), x,
                    _with(x, wc=1.0 - wg, wd=np.zeros(n)), np.ones(n))
    wc = np.clip(t, 0.0, 1.0) * (1.0 - wg)
    wc = np.where(t < 0, np.nan, wc)
    return _with(x, wc=wc, wd=1.0 - wg - wc)


def _grid_eval(cfg, hw, sh, budgets_gib, free, pts, keep, exact) -> list[tuple[float, np.ndarray]]:
    from engine.planning.cost_model import block_time

    x = _filled(cfg, hw, sh, budgets_gib, free, pts)
    ok = np.ones(len(pts), dtype=bool)
    for k in FRACTIONS:
        v = np.asarray(getattr(x, k), dtype=float)
        ok &= np.isfinite(v) & (v >= -1e-12)
    ok &= np.asarray(x.wd, dtype=float) <= max_weights_disk_fraction(cfg) + 1e-9  # as the LP
    for tier, peak in peak_bytes(cfg, hw, sh, x, exact=exact).items():
        lim = budgets_gib.get(tier)
        if lim is not None:
            ok &= np.asarray(peak) <= lim * GIB * (1 + 1e-9)
    if not ok.any():
        return []
    t = np.broadcast_to(np.asarray(block_time(cfg, hw, sh, x), dtype=float), ok.shape)
    t = np.where(ok, t, np.inf)
    order = np.argsort(t)[:keep]
    return [(float(t[i]), pts[i].copy()) for i in order if np.isfinite(t[i])]


def grid_plan(config: OPTConfig, hardware: HardwareProfile, *, gpu_mem_gib, cpu_mem_gib,
              disk_mem_gib=None, prompt_len: int, gen_len: int, **shape_kw) -> tuple[float, Shape] | None:
    """Best tokens/s by grid search over the same enumeration as `plan` (no pruning)."""
    budgets = budgets_bytes(hardware, gpu_mem_gib, cpu_mem_gib, disk_mem_gib)
    best = None
    for sh in shapes(hardware, prompt_len=prompt_len, gen_len=gen_len, **shape_kw):
        res = grid_search(config, hardware, sh, budgets, exact=True)  # what `plan` must satisfy
        if res is not None:
            tps = sh.block_size * gen_len / res[0]
            if best is None or tps > best[0]:
                best = (tps, sh)
    return best
