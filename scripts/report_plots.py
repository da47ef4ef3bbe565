"""The benchmark report's figures: PNGs drawn from bench_stats.analyze's output and the tune records only.

Validation loss vs steps / tokens / training time (median over seeds, band = min..max over seeds), the
learning-rate sensitivity of the tune trials, and steps to target with bootstrap CIs. matplotlib's Agg
canvas through Figure objects (no pyplot state, no display needed).

    python scripts/report.py results/bench_tiny      (writes results/bench_tiny/plots/*.png)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import blended_transform_factory

from scripts.bench_records import RunRecord
from scripts.bench_stats import same_value, value_str

DPI = 110
X_AXES = {"step": ("steps", "optimizer steps"), "tokens": ("tokens", "training tokens"),
          "time_s": ("time", "training time (s, evaluation excluded)")}


def _colors(arms: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _figure(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _target_line(ax, target: float | None) -> None:
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:.4f}")


def plot_curves(bench: dict, analysis: dict, x: str, path: Path) -> Path:
    """Validation loss vs x (step, tokens or time_s): one line per arm (median over its seed runs), band from
    the min to the max over seeds. The y range skips the first 10% of the budget so the end is readable."""
    name, label = X_AXES[x]
    fig, ax = _figure(f"{bench['name']}: validation loss vs {name} (median over seeds, band = min..max)")
    colors, tail = _colors(list(analysis["arms"])), []
    for arm, a in analysis["arms"].items():
        curve = a["curve"]
        if not curve:
            continue
        xs = [p[x] for p in curve]
        ax.plot(xs, [p["loss"] for p in curve], color=colors[arm], label=f"{arm} ({a['n_seed']} seeds)")
        ax.fill_between(xs, [p["lo"] for p in curve], [p["hi"] for p in curve], color=colors[arm], alpha=0.2)
        last = curve[-1]["step"]
        tail += [v for p in curve if p["step"] >= 0.1 * last for v in (p["lo"], p["hi"])]
    _target_line(ax, analysis["target"]["loss"])
    if tail:
        span = max(tail) - min(tail) or 1.0
        ax.set_ylim(min(tail) - 0.05 * span, max(tail) + 0.05 * span)
    ax.set_xlabel(label)
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend()
    fig.savefig(path)
    return path


def lr_axis(grid: dict[str, list]) -> str | None:
    """The learning-rate axis of a grid: optimizer.lr, else the first axis whose last part ends in lr."""
    if "optimizer.lr" in grid:
        return "optimizer.lr"
    return next((a for a in grid if a.split(".")[-1].endswith("lr")), None)


def plot_lr_sensitivity(bench: dict, analysis: dict, runs: list[RunRecord], path: Path) -> Path:
    """Final validation loss of every tune trial vs its learning rate (log x), one line per arm through the
    chosen setting's other-axis values; diverged trials as crosses at the top; the chosen trial circled."""
    seed = bench.get("tuning_seed")
    fig, ax = _figure(f"{bench['name']}: learning-rate sensitivity (tune trials, seed {seed})")
    colors, finite, lrs = _colors(list(analysis["arms"])), [], set()
    top = blended_transform_factory(ax.transData, ax.transAxes)
    for arm, a in analysis["arms"].items():
        axis, chosen = lr_axis(a["grid"]), a["chosen"]["setting"] or {}
        if axis is None:
            continue
        line = sorted((r for r in runs if r.arm == arm and r.phase == "tune" and all(
            same_value(r.setting.get(k), v) for k, v in chosen.items() if k != axis)),
            key=lambda r: r.setting[axis])
        ok = [r for r in line if not r.diverged]
        finite += [r.final_loss for r in ok]
        fixed = ", ".join(f"{k.split('.')[-1]}={value_str(v)}" for k, v in chosen.items() if k != axis)
        ax.plot([r.setting[axis] for r in ok], [r.final_loss for r in ok], "o-", color=colors[arm],
                label=f"{arm}" + (f" ({fixed})" if fixed else ""))
        lrs |= {r.setting[axis] for r in line}
        ax.plot([r.setting[axis] for r in line if r.diverged], [0.97] * sum(r.diverged for r in line), "x",
                color=colors[arm], markersize=10, mew=2, transform=top)
        ax.plot([r.setting[axis] for r in ok if r.trial == a["chosen"]["trial"]],
                [r.final_loss for r in ok if r.trial == a["chosen"]["trial"]], "o", mfc="none", mec="black",
                markersize=13)
    _target_line(ax, analysis["target"]["loss"])
    if finite:
        span = max(finite) - min(finite) or 1.0
        ax.set_ylim(min(finite) - 0.1 * span, max(finite) + 0.25 * span)  # headroom for the diverged crosses
    ax.set_xscale("log")
    if 0 < len(lrs) <= 12:  # label the grid values themselves rather than log decades, while they fit
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted(lrs), [value_str(v) for v in sorted(lrs)], rotation=45)
    ax.set_xlabel("learning rate (log scale); x at the top = diverged, circle = chosen")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.legend()
    fig.savefig(path)
    return path


def plot_steps_to_target(bench: dict, analysis: dict, path: Path) -> Path:
    """Median steps to target per arm with its bootstrap 95% CI as error bars and each seed as a dot; arms
    that miss the target in some seed are hatched and annotated with how many seeds reached it."""
    fig, ax = _figure(f"{bench['name']}: steps to target {analysis['target']['loss'] or float('nan'):.4f} "
                      "(median, bootstrap 95% CI)")
    colors = _colors(list(analysis["arms"]))
    names = list(analysis["arms"])
    for i, arm in enumerate(names):
        a = analysis["arms"][arm]
        s, n = a["steps"], a["n_seed"]
        med = s["median"] if s["median"] is not None and math.isfinite(s["median"]) else 0.0
        ax.bar(i, med, color=colors[arm], alpha=0.8, hatch=None if s["ci"] else "//", edgecolor="black")
        if s["ci"]:
            ax.errorbar(i, med, yerr=[[med - s["ci"][0]], [s["ci"][1] - med]], color="black", capsize=8)
        seeds = [p["steps"] for p in a["per_seed"] if math.isfinite(p["steps"])]
        ax.plot([i] * len(seeds), seeds, "o", color="black", markersize=4)
        if s["reached"] < n or not n:
            ax.annotate(f"reached in {s['reached']}/{n} seeds", (i, med), ha="center", va="bottom",
                        xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("arm (dots = seeds; hatched = target missed in some seed)")
    ax.set_ylabel("optimizer steps to target (first evaluation <= target)")
    fig.savefig(path)
    return path


def make_plots(bench: dict, analysis: dict, runs: list[RunRecord], out_dir: Path) -> dict[str, Path]:
    """Every figure of the report, written to out_dir; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {f"loss_vs_{name}": plot_curves(bench, analysis, x, out_dir / f"loss_vs_{name}.png")
             for x, (name, _) in X_AXES.items()}
    paths["lr_sensitivity"] = plot_lr_sensitivity(bench, analysis, runs, out_dir / "lr_sensitivity.png")
    paths["steps_to_target"] = plot_steps_to_target(bench, analysis, out_dir / "steps_to_target.png")
    return paths
