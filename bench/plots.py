"""The benchmark report's figures, drawn from bench/analysis.py's output and the run records only.

matplotlib's Agg canvas through Figure objects (no pyplot state, no display needed):
    loss_vs_budget   end-of-schedule loss vs step budget per arm (median over seeds, band min..max), with the
                     target and the unigram / bigram / trigram cross-entropies as lines (the first figure)
    loss_curves      validation loss vs step of the full-budget seed runs (median over seeds)
    best_of_k        expected best tuning-seed loss after k trials (Dodge et al. 2019), per arm
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from bench.records import RunRecord

DPI = 110
NGRAM_STYLE = {"unigram": ":", "bigram": "-.", "trigram": "--"}


def _colors(arms: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(arms)}


def _figure(title: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def _reference_lines(ax, analysis: dict) -> None:
    t = analysis["target"]["loss"]
    if t is not None:
        ax.axhline(t, color="black", linestyle="-", linewidth=0.8, label=f"target {t:.3f}")
    for name, style in NGRAM_STYLE.items():
        v = (analysis["baselines"] or {}).get(name)
        if v is not None:
            ax.axhline(v, color="grey", linestyle=style, linewidth=1, label=f"{name} {v:.3f}")


def plot_loss_vs_budget(analysis: dict, path: Path) -> Path:
    b = analysis["bench"]
    fig, ax = _figure(f"{b['name']}: end-of-schedule validation loss vs budget (median over seeds, band min..max)")
    colors = _colors(list(analysis["arms"]))
    for arm, a in analysis["arms"].items():
        if not a["budgets"] or a["variant_of"]:
            continue
        lo = [min(a["losses"][B].values()) for B in a["budgets"]]
        hi = [max(a["losses"][B].values()) for B in a["budgets"]]
        ax.plot(a["budgets"], a["curve"], "o-", color=colors[arm], label=f"{arm} ({a['n_seeds']} seeds)")
        ax.fill_between(a["budgets"], lo, hi, color=colors[arm], alpha=0.15)
    _reference_lines(ax, analysis)
    ax.set_xscale("log")
    ax.set_xticks(b["budgets"], [str(x) for x in b["budgets"]])
    ax.xaxis.set_minor_formatter(NullFormatter())  # the budgets are the only labels
    ax.set_xlabel("step budget (each point: a run whose schedule ends there)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    return path


def plot_loss_curves(analysis: dict, runs: list[RunRecord], path: Path) -> Path:
    b = analysis["bench"]
    fig, ax = _figure(f"{b['name']}: validation loss of the full-budget seed runs (median over seeds)")
    colors = _colors(list(analysis["arms"]))
    full = b["budgets"][-1]
    tail = []
    for arm in analysis["arms"]:
        seeds = [r for r in runs if r.arm == arm and r.phase == "seed" and r.budget == full and not r.diverged]
        if not seeds:
            continue
        by_step = [{e["step"]: e["val_loss"] for e in s.evals} for s in seeds]
        steps = sorted(set.intersection(*(set(d) for d in by_step)))  # the evaluation steps every seed has
        med = [statistics.median(d[st] for d in by_step) for st in steps]
        ax.plot(steps, med, color=colors[arm], label=arm)
        tail += [v for s, v in zip(steps, med) if s >= 0.2 * full]
    _reference_lines(ax, analysis)
    if tail:
        lines = [v for v in (analysis["baselines"] or {}).values() if isinstance(v, float)]
        lo, hi = min(tail + lines[1:2]), max(tail)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    return path


def plot_best_of_k(analysis: dict, path: Path) -> Path:
    b = analysis["bench"]
    fig, ax = _figure(f"{b['name']}: expected best tuning loss after k of {b['search']['trials']} trials")
    colors = _colors(list(analysis["arms"]))
    for arm, a in analysis["arms"].items():
        if a["best_of_k"]:
            ks = range(1, len(a["best_of_k"]) + 1)
            ax.plot(list(ks), a["best_of_k"], "o-", color=colors[arm], label=arm)
    ax.set_xlabel("k (trials drawn without replacement from the arm's search)")
    ax.set_ylabel("expected best final validation loss")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    return path


def make_plots(analysis: dict, runs: list[RunRecord], out_dir: Path) -> dict[str, Path]:
    """Every figure of the report, written to out_dir; returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"loss_vs_budget": plot_loss_vs_budget(analysis, out_dir / "loss_vs_budget.png"),
            "loss_curves": plot_loss_curves(analysis, runs, out_dir / "loss_curves.png"),
            "best_of_k": plot_best_of_k(analysis, out_dir / "best_of_k.png")}
