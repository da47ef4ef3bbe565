"""The scaling ladder's report (protocol.md v2, "Scaling ladder"): per arm, the data-equivalent speedup over
the reference at every rung (model size), fitted linear in log10 of the non-embedding parameters N, with a
paired seed bootstrap interval of the slope; summary.json, report.md, report.html and
plots/speedup_vs_size.png, rebuilt from the ladder directory's ladder.json and the rungs' run records alone.
scripts/ladder.py declares and runs the ladder (its module docstring: the budget rule).

    python -c "from bench.ladder import build_ladder_report; build_ladder_report('results/ladder_cpu')"

The method (FIT_METHOD, also printed in the report): a rung's speedup is Marin's data-equivalent speedup as
bench/analysis.py computes it per budget (bench/stats.data_equivalent_speedup of the arm's median loss over the
reference's median loss-vs-budget curve, a diverged seed counted as the worst value), compared at one fraction
of each rung's full budget for every rung (fit_budget), so that every point has the same tokens per parameter.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from bench import stats
from bench.analysis import analyze, median, summary
from bench.records import RecordError, load_runs
from bench.render import to_html, to_markdown
from runtime.files import atomic_write_json, atomic_write_text

LADDER_FILE = "ladder.json"  # scripts/ladder.py writes it: the rungs, their sizes, budgets and directories
REPLICATES, BOOT_SEED = 2000, 0
MIN_RUNGS, MIN_SPAN = 3, 8.0  # protocol.md: >= 3 sizes spanning >= 8x in non-embedding parameters
# Marin (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find Them"; protocol.md): Muon about
# 1.3-1.4x over AdamW at 130M parameters, about 1.1x at 1.2B: (1.1 - 1.35) / log10(1.2e9 / 130e6) per decade
MARIN = {"small": 130e6, "large": 1.2e9, "at_small": 1.35, "at_large": 1.1}
MARIN_SLOPE = (MARIN["at_large"] - MARIN["at_small"]) / math.log10(MARIN["large"] / MARIN["small"])
FIT_METHOD = (
    "Speedup: Marin's data-equivalent speedup (bench/stats.data_equivalent_speedup): the budget at which the "
    "reference's median loss-vs-budget curve (log-linear between its budgets) reaches the arm's median "
    "end-of-schedule loss, over the arm's budget; medians over the fresh seeds, a diverged seed counted as the "
    "worst value. Each arm is compared at one fraction of every rung's full budget (1, 1/2 or 1/4: the same "
    "tokens per parameter at every size): the largest at which every rung's speedup is interpolated within the "
    "reference's budgets (an arm better than the reference at the full budget lies below the reference's whole "
    "curve, so its full-budget figure is always extrapolated). When no fraction has every rung interpolated, "
    "the full budget's extrapolated figures are used, flagged, and never a headline. A rung whose speedup is "
    "undefined (None: a reference curve that does not fall there, or most seeds diverged) is left out of the "
    "fit and named. Fit: speedup linear in log10 N (least squares); slope_per_decade = the change in speedup "
    "per 10x non-embedding parameters. CI: paired seed bootstrap (every rung's seeds resampled with replacement, "
    f"one draw for all arms; {REPLICATES} replicates, numpy seed {BOOT_SEED}; percentile 95%). It holds the "
    "seed noise only; the Student t interval of the least-squares slope (n - 2 df), which counts the points' "
    "scatter about the line, is reported beside it (ci_t) and replaces it when the bootstrap is degenerate "
    "(a rung with < 2 seeds, a constant slope, or over half the replicates undefined).")


@dataclass
class RungLosses:
    """One rung's fresh-seed end-of-schedule losses: arm -> budget -> seed -> loss (inf: diverged)."""
    name: str
    n: int  # non-embedding parameters
    seeds: list[int]
    budgets: list[int]
    losses: dict[str, dict[int, dict[int, float]]]


def curve(losses: dict[int, dict[int, float]], budgets: list[int], seeds: list[int]) -> list[float | None]:
    """The median over `seeds` (repeats count: a bootstrap replicate) at each budget, as bench/analysis.py's
    loss-vs-budget curve: a diverged seed counts as the worst value, a missing one is left out."""
    return [median([losses.get(B, {})[s] for s in seeds if s in losses.get(B, {})]) for B in budgets]


def speedup(r: RungLosses, arm: str, ref_curve: list[float | None], k: int, seeds: list[int]) -> dict:
    """stats.data_equivalent_speedup of the arm's median loss at budget index k over the reference's curve."""
    B = r.budgets[k]
    return stats.data_equivalent_speedup(r.budgets, ref_curve, B, curve(r.losses.get(arm, {}), [B], seeds)[0])


def fit_budget(rungs: list[RungLosses], arm: str, ref: str) -> int:
    """The budget index an arm is compared at, the same at every rung (its full budget, 1/2 or 1/4 of it: one
    tokens per parameter): the largest at which every rung's speedup is interpolated within the reference's
    budgets; when none is, the full budget (its extrapolated points flagged). Rungs without the arm's runs
    are left aside (they are `excluded` from its fit)."""
    ran = [r for r in rungs if r.losses.get(arm)]
    curves = [curve(r.losses[ref], r.budgets, r.seeds) for r in ran]
    last = min(len(r.budgets) for r in rungs) - 1
    for k in range(last, -1, -1):
        pts = [speedup(r, arm, c, k, r.seeds) for r, c in zip(ran, curves)]
        if all(p["value"] is not None and not p["extrapolated"] for p in pts):
            return k
    return last


def bootstrap(rungs: list[RungLosses], arms: list[str], ref: str, ks: dict[str, int], reps: int = REPLICATES,
              seed: int = BOOT_SEED) -> dict[str, np.ndarray]:
    """Paired seed bootstrap: each replicate resamples every rung's seeds with replacement, one draw for every
    arm and the reference (seed s pairs the same initial weights and data order across arms), and recomputes
    each arm's speedup at its fit budget. arm -> (reps, rungs) array, nan where undefined."""
    rng = np.random.default_rng(seed)
    out = {a: np.full((reps, len(rungs)), np.nan) for a in arms}
    for i in range(reps):
        for j, r in enumerate(rungs):
            seeds = [r.seeds[x] for x in rng.integers(0, len(r.seeds), len(r.seeds))]
            ref_curve = curve(r.losses[ref], r.budgets, seeds)
            for a in arms:
                v = speedup(r, a, ref_curve, ks[a], seeds)["value"]
                out[a][i, j] = np.nan if v is None else v
    return out


def ols(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Least squares y = a + b x; b's two-sided 95% Student t interval on n - 2 df (None below 3 points)."""
    xc = x - x.mean()
    b = float(xc @ (y - y.mean()) / (xc @ xc))
    a = float(y.mean() - b * x.mean())
    if len(x) < 3:
        return {"slope": b, "intercept": a, "ci_t": None}
    se = math.sqrt(float(((y - a - b * x) ** 2).sum()) / (len(x) - 2) / float(xc @ xc))
    half = float(sps.t.ppf(0.975, len(x) - 2)) * se
    return {"slope": b, "intercept": a, "ci_t": [b - half, b + half]}


def _interval(v: np.ndarray) -> list[float] | None:
    v = v[np.isfinite(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else None


def _slope_interval(x: np.ndarray, cols: np.ndarray, min_seeds: int, f: dict) -> tuple[Any, str, int]:
    """The slope's 95% interval: the percentile interval of the replicates' least-squares slopes (those with
    every point defined), or f's t interval when the bootstrap is degenerate; its method; replicates used."""
    rows = cols[np.isfinite(cols).all(axis=1)]
    xc = x - x.mean()
    slopes = (rows - rows.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    if len(slopes) >= 0.5 * len(cols) and min_seeds >= 2 and float(np.ptp(slopes)) > 1e-12:
        return _interval(slopes), f"paired seed bootstrap ({len(cols)} replicates, percentile 95%)", len(slopes)
    return f["ci_t"], "t (least-squares slope, n - 2 df): the seed bootstrap is degenerate", len(slopes)


def fit_arm(rungs: list[RungLosses], arm: str, ref: str, k: int, boot: np.ndarray) -> dict[str, Any]:
    """One arm's fit at budget index k (fit_budget): its points, the least-squares line of speedup in log10 N,
    the slope's interval, each point's bootstrap interval. Rungs with an undefined speedup are `excluded`."""
    pts = [speedup(r, arm, curve(r.losses[ref], r.budgets, r.seeds), k, r.seeds) for r in rungs]
    use = [j for j, p in enumerate(pts) if p["value"] is not None]
    out = {"budget_fraction": 2.0 ** (k - (len(rungs[0].budgets) - 1)),
           "excluded": [r.name for j, r in enumerate(rungs) if j not in use],
           "rungs": [rungs[j].name for j in use], "points": [[rungs[j].n, pts[j]["value"]] for j in use],
           "points_ci": [_interval(boot[:, j]) for j in use],
           "extrapolated": [pts[j]["extrapolated"] for j in use],
           "slope_per_decade": None, "intercept": None, "ci": None, "ci_t": None, "bootstrap_used": 0,
           "ci_method": "none: fewer than 2 rungs with a speedup", "speedup_at_smallest": None,
           "speedup_at_largest": None}
    if len(use) < 2:
        return out
    x = np.log10([float(rungs[j].n) for j in use])
    f = ols(x, np.array([pts[j]["value"] for j in use]))
    ci, method, used = _slope_interval(x, boot[:, use], min(len(rungs[j].seeds) for j in use), f)
    at = lambda v: f["intercept"] + f["slope"] * float(v)  # the fitted line at log10 N = v
    return {**out, "slope_per_decade": f["slope"], "intercept": f["intercept"], "ci": ci, "ci_t": f["ci_t"],
            "ci_method": method, "bootstrap_used": used, "speedup_at_smallest": at(x.min()),
            "speedup_at_largest": at(x.max())}


def fits(rungs: list[RungLosses], arms: list[str], ref: str, reps: int = REPLICATES,
         seed: int = BOOT_SEED) -> dict[str, dict[str, Any]]:
    """Every arm's fit of speedup against log10 N (rungs in ascending N)."""
    ks = {a: fit_budget(rungs, a, ref) for a in arms}
    boot = bootstrap(rungs, arms, ref, ks, reps, seed)
    return {a: fit_arm(rungs, a, ref, ks[a], boot[a]) for a in arms}


# ---- the report: summary.json, report.md / .html, plots/speedup_vs_size.png ------------------------------


def read_ladder(ladder_dir: Path) -> dict[str, Any]:
    path = ladder_dir / LADDER_FILE
    if not path.is_file():
        raise RecordError(f"{ladder_dir} is not a ladder directory (no {LADDER_FILE}: scripts/ladder.py "
                          "writes it)")
    return json.loads(path.read_text())


def committed_rung(d: Path) -> tuple[dict, dict, list[int]]:
    """A rung read from its committed report alone (summary.json, runs.csv, bench.json): the checkout of a
    fresh clone, which holds a benchmark's report but not its run records (.gitignore). Returns its summary,
    arm -> budget -> seed -> end-of-schedule loss (inf: diverged) of the fresh-seed runs, and its seeds;
    RecordError when a file is missing or runs.csv disagrees with summary.json's medians."""
    paths = [d / n for n in ("summary.json", "runs.csv", "bench.json")]
    if missing := [p.name for p in paths if not p.is_file()]:
        raise RecordError(f"{d}: no run records and no committed report ({', '.join(missing)} missing)")
    s = json.loads(paths[0].read_text())
    losses: dict[str, dict[int, dict[int, float]]] = {}
    with open(paths[1], newline="") as f:
        for row in csv.DictReader(f):
            if row["phase"] in ("seed", "branch"):
                v = float(row["final_val_loss"] or "inf")  # runs.csv leaves a diverged run's loss empty
                losses.setdefault(row["arm"], {}).setdefault(int(row["budget"]), {})[int(row["seed"])] = \
                    math.inf if row["diverged"] == "True" or not math.isfinite(v) else v
    losses = {a: {b: dict(sorted(v.items())) for b, v in sorted(by.items())} for a, by in losses.items()}  # analyze's
    for arm, a in s["arms"].items():  # the two files must be one report's: every arm's full-budget median
        full = losses.get(arm, {}).get(max(s["workload"]["budgets"]), {})
        got, want = median(full.values()), (a.get("end_loss") or {}).get("median")
        got = None if got is not None and math.isinf(got) else got  # summary.json writes an infinite median as null
        if (got is None) != (want is None) or (got is not None and want is not None and abs(got - want) > 1e-9):
            raise RecordError(f"{d}: runs.csv's median end loss of {arm} ({got}) is not summary.json's ({want})")
    return s, losses, list(json.loads(paths[2].read_text())["seeds"])


def _rung(ladder_dir: Path, rec: dict, arms: list[str], ref: str) -> tuple[dict, RungLosses, list, list]:
    """One rung's entry of summary.json `sizes`, its losses for the fit, the ladder's flags about it and its
    own report's flags; RecordError when its directory holds no complete seed run yet. A rung whose directory
    has no run records (runs/) is read from its committed report (committed_rung), and flagged."""
    d = (ladder_dir / rec["dir"]).resolve()
    if (d / "runs").is_dir():
        an = analyze(d, load_runs(d))
        s = summary(an)
        all_losses, seeds, source = {a: v["losses"] for a, v in an["arms"].items()}, list(an["bench"]["seeds"]), []
    else:
        s, all_losses, seeds = committed_rung(d)
        an = {"reference": s["reference"], "flags": s.get("flags", [])}
        source = [(f"rung {rec['name']}: read from its committed report (summary.json, runs.csv): its run records "
                   "are not in this checkout")]
    if an["reference"] != ref:
        raise RecordError(f"{d}: its reference is {an['reference']!r}, the ladder's {ref!r}")
    w, budgets = s["workload"], list(s["workload"]["budgets"])
    n, tokens = int(w["non_embedding_params"]), round(budgets[-1] * w["tokens_per_step"])
    end = (s["arms"].get(ref) or {}).get("end_loss")
    ref_loss, tri = end and end["median"], (s["baselines"] or {}).get("trigram")
    entry = {"rung": rec["name"], "dir": str(d), "shared": rec["shared"], "non_embedding_params": n,
             "n_params": w["n_params"], "tokens": tokens, "tokens_per_param": tokens / n, "epochs": w["epochs"],
             "budgets": budgets, "baselines": s["baselines"], "workload_checks": s.get("workload_checks"),
             "reference_end_loss": ref_loss,
             "reference_beats_trigram": None if tri is None or ref_loss is None else ref_loss < tri,
             "arms": {a: s["arms"][a] for a in arms if a in s["arms"]}}
    flags = source
    if entry["reference_beats_trigram"] is False:
        flags.append(f"rung {rec['name']}: the reference ({ref}) ends at {ref_loss:.4f}, not below the trigram "
                     f"baseline {tri:.4f}: at this size the benchmark measures n-gram learning")
    if rec.get("non_embedding_params", n) != n:
        flags.append(f"rung {rec['name']}: its records' model has {n:,} non-embedding parameters, "
                     f"{LADDER_FILE} {rec['non_embedding_params']:,}")
    losses = {a: all_losses[a] for a in [ref, *arms] if a in all_losses}
    data = RungLosses(rec["name"], n, seeds, budgets, losses)
    return entry, data, flags, [f"rung {rec['name']}: {f}" for f in an["flags"]]


def _point(f: dict, rung: str) -> dict | None:
    if rung not in f["rungs"]:
        return None
    j = f["rungs"].index(rung)
    return {"budget_fraction": f["budget_fraction"], "value": f["points"][j][1],
            "extrapolated": f["extrapolated"][j], "ci": f["points_ci"][j]}


def fit_flags(result: dict[str, dict]) -> list[str]:
    flags = []
    for a, f in result.items():
        if any(f["extrapolated"]):
            flags.append(f"{a}: its speedups are extrapolated beyond the reference's budgets (no budget fraction "
                         "has every rung interpolated): its fit is not a headline")
        if f["excluded"]:
            flags.append(f"{a}: no speedup at {', '.join(f['excluded'])} (undefined there): left out of the fit")
    return flags


def ladder_summary(ladder_dir: Path, reps: int = REPLICATES, seed: int = BOOT_SEED) -> dict[str, Any]:
    """summary.json: `sizes` (one entry per analysed rung, ascending N), `fits` (every arm but the reference)."""
    lad = read_ladder(ladder_dir)
    ref = lad["reference"]
    arms = [a for a in lad["arms"] if a != ref]
    rows, flags = [], []
    for rec in lad["rungs"]:
        try:
            rows.append(_rung(ladder_dir, rec, lad["arms"], ref))
        except RecordError as e:
            flags.append(f"rung {rec['name']} is not in this report: {e}")
    rows.sort(key=lambda row: row[1].n)
    sizes, data = [r[0] for r in rows], [r[1] for r in rows]
    flags += [f for r in rows for f in r[2]]
    if len(data) < MIN_RUNGS or data[-1].n < MIN_SPAN * data[0].n:
        span = f", spanning {data[-1].n / data[0].n:.1f}x in N" if data else ""
        flags.append(f"{len(data)} rungs analysed{span}: the protocol's ladder has >= {MIN_RUNGS} sizes spanning "
                     f">= {MIN_SPAN:g}x")
    result = fits(data, arms, ref, reps, seed) if len(data) >= 2 else {}
    flags += fit_flags(result)
    for entry in sizes:
        entry["speedups"] = {a: _point(f, entry["rung"]) for a, f in result.items()}
    return {"protocol": 2, "ladder": lad["name"], "description": lad.get("description", ""),
            "base": lad["base"], "reference": ref, "muon_reference": lad["muon_reference"],
            "tokens_per_param": lad["tokens_per_param"],
            "fit_method": FIT_METHOD, "marin": {**MARIN, "slope_per_decade": MARIN_SLOPE}, "sizes": sizes,
            "fits": result, "flags": flags, "rung_flags": [f for r in rows for f in r[3]]}


def _ci(c: list[float] | None, spec: str = "+.3f") -> str:
    return "-" if not c else f"[{c[0]:{spec}}, {c[1]:{spec}}]"


def reading(arm: str, f: dict, ref: str) -> str:
    """The answer for one arm in words: the slope's sign, and whether its interval excludes 0."""
    s = f["slope_per_decade"]
    if s is None:
        return f"**{arm}**: no fit ({f['ci_method']})."
    way = "shrinks" if s < 0 else "grows" if s > 0 else "neither shrinks nor grows"
    ci, boot = f["ci"], f["ci_method"].startswith("paired")
    if ci is None:
        sure = "no interval with 2 rungs"
    elif ci[0] > 0 or ci[1] < 0:
        beyond = "seed noise" if boot else "the scatter about the line"
        sure = f"95% CI {_ci(ci)} excludes 0: resolved beyond {beyond}"
    else:
        sure = f"95% CI {_ci(ci)} includes 0: not resolved at these seeds and sizes"
    if boot and f["ci_t"]:
        sure += f" (the t interval, which also counts the scatter about the line: {_ci(f['ci_t'])})"
    values = [v for _, v in f["points"]]
    return (f"**{arm}**: the speedup over {ref} {way} with scale, {s:+.3f} per 10x non-embedding parameters; "
            f"{sure}. Fitted {f['speedup_at_smallest']:.2f}x at the smallest rung, "
            f"{f['speedup_at_largest']:.2f}x at the largest, compared at {f['budget_fraction']:g} of each rung's "
            "full budget"
            + (f"; not above 1 (slower than {ref}: a rising speedup closes the gap)"
               if max(values) <= 1 and min(values) < 1 else "")
            + (". Extrapolated points: not a headline." if any(f["extrapolated"]) else "."))


def regime_text(summ: dict) -> str | None:
    """Said beside the answer when some rungs' reference ends above the trigram baseline: a trend through them
    mixes model size with the n-gram regime (where the hidden matrices, which the matrix optimizers act on, carry
    little of the loss), so the slope is then not a statement about scale alone."""
    above = [s["rung"] for s in summ["sizes"] if s["reference_beats_trigram"] is False]
    if not above:
        return None
    below = [s["rung"] for s in summ["sizes"] if s["reference_beats_trigram"]]
    return (f"Read the slopes with care: at {', '.join(above)} ({len(above)} of {len(summ['sizes'])} rungs) the "
            f"reference ends above the trigram baseline, so there the benchmark measures n-gram learning, and a "
            f"trend fitted through those rungs mixes model size with that regime. "
            + (f"Only {', '.join(below)} measure{'s' if len(below) == 1 else ''} optimization past it."
               if below else "No rung measures optimization past it."))


def marin_text(summ: dict) -> str:
    muon, ns = summ["muon_reference"], [s["non_embedding_params"] for s in summ["sizes"]]
    f = summ["fits"].get(muon)
    text = ("Marin (Wen et al. 2025) reads Muon at about 1.3-1.4x over AdamW at 130M parameters falling to about "
            f"1.1x at 1.2B: about {MARIN_SLOPE:+.2f} per 10x. ")
    if f and f["slope_per_decade"] is not None:
        same = (f["slope_per_decade"] < 0) == (MARIN_SLOPE < 0)
        text += (f"This ladder's {muon}: {f['slope_per_decade']:+.3f} per 10x {_ci(f['ci'])}, "
                 f"{'the same sign as' if same else 'the opposite sign to'} Marin's. ")
    if ns and max(ns) < MARIN["small"]:
        text += (f"These sizes, {min(ns):,} to {max(ns):,} non-embedding parameters, are "
                 f"{MARIN['small'] / max(ns):,.0f}x to {MARIN['large'] / min(ns):,.0f}x below Marin's 130M-1.2B "
                 "(Marin names its models by all their parameters): this says how the optimizers behave on models "
                 "this small, not whether Marin's trend holds.")
    elif ns:
        text += ("The largest rungs reach the low end of Marin's sizes (Marin counts all parameters, this ladder "
                 "non-embedding ones).")
    return text


def plot_speedups(summ: dict, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter

    from bench.plots import _colors, _figure

    ref = summ["reference"]
    fig, ax = _figure(f"{summ['ladder']}: data-equivalent speedup over {ref} vs size (95% seed-bootstrap bars; "
                      "fit linear in log10 N)")
    colors = _colors(list(summ["fits"]))
    for arm, f in summ["fits"].items():
        if not f["points"]:
            continue
        n, s = np.array([p[0] for p in f["points"]], float), np.array([p[1] for p in f["points"]])
        ci = [c or [v, v] for c, v in zip(f["points_ci"], s)]
        err = [[max(v - c[0], 0) for c, v in zip(ci, s)], [max(c[1] - v, 0) for c, v in zip(ci, s)]]
        ax.errorbar(n, s, yerr=err, fmt="none", ecolor=colors[arm], capsize=3, alpha=0.7)
        ext = np.array(f["extrapolated"], bool)
        label = f"{arm} (at {f['budget_fraction']:g} of the budget)"
        ax.plot(n[~ext], s[~ext], "o", color=colors[arm], label=label)
        if ext.any():
            ax.plot(n[ext], s[ext], "o", mfc="none", color=colors[arm], label=f"{arm}: extrapolated")
        if f["slope_per_decade"] is not None:
            xs = np.geomspace(n.min(), n.max(), 50)
            ax.plot(xs, f["intercept"] + f["slope_per_decade"] * np.log10(xs), "-", color=colors[arm], lw=1.2)
    ax.axhline(1.0, color="black", linewidth=0.8, label=f"{ref} (reference)")
    ax.set_xscale("log")
    ns = [s["non_embedding_params"] for s in summ["sizes"]]
    ax.set_xticks(ns, [f"{s['rung']}\n{n:,}" for s, n in zip(summ["sizes"], ns)])
    ax.xaxis.set_minor_formatter(NullFormatter())  # the rungs are the only labels
    ax.set_xlabel("non-embedding parameters N (log scale)")
    ax.set_ylabel(f"data-equivalent speedup over {ref}")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    return path


def _speedup_cell(p: dict | None) -> str:
    if not p or p["value"] is None:
        return "-"
    return f"{p['value']:.2f} {_ci(p['ci'], '.2f')}" + (" (extrapolated)" if p["extrapolated"] else "")


def _fit_row(arm: str, f: dict, tokens_per_param: float) -> list[str]:
    from bench.report import fmt

    slope = "-" if f["slope_per_decade"] is None else f"{f['slope_per_decade']:+.3f} {_ci(f['ci'])}"
    return [arm, f"{f['budget_fraction']:g} ({f['budget_fraction'] * tokens_per_param:g} tokens/param)",
            str(len(f["points"])), slope, f["ci_method"], _ci(f["ci_t"]),
            f"{fmt(f['speedup_at_smallest'], '.2f')} / {fmt(f['speedup_at_largest'], '.2f')}"]


def _rung_rows(s: dict, arms: list[str]) -> tuple[list[str], list[str]]:
    """A rung's row of the rungs table and of the n-gram table."""
    from bench.report import fmt

    end = {a: (x.get("end_loss") or {}).get("median") for a, x in s["arms"].items()}
    b = s["baselines"] or {}
    beats = {True: "yes", False: "NO (flagged)", None: "-"}[s["reference_beats_trigram"]]
    return ([s["rung"], f"{s['non_embedding_params']:,}", f"{s['n_params']:,}", f"{s['tokens']:,}",
             f"{s['tokens_per_param']:.1f}", fmt(s["epochs"], ".2f"), str(s["budgets"]),
             fmt(s["reference_end_loss"]),
             *[f"{fmt(end.get(a))}; {_speedup_cell(s['speedups'].get(a))}" for a in arms]],
            [s["rung"], fmt(b.get("unigram")), fmt(b.get("bigram")), fmt(b.get("trigram")),
             fmt(s["reference_end_loss"]), beats])


def tables(summ: dict) -> list[tuple]:
    ref, arms = summ["reference"], list(summ["fits"])
    rows = [_rung_rows(s, arms) for s in summ["sizes"]]
    return [("h2", "Fits"),
            ("table", ["arm", "compared at (fraction of each rung's budget)", "rungs", "slope per 10x N [95% CI]",
                       "CI method", "t interval", "fitted speedup at smallest / largest N"],
             [_fit_row(a, f, summ["tokens_per_param"]) for a, f in summ["fits"].items()]),
            ("p", FIT_METHOD),
            ("h2", "Rungs"),
            ("table", ["rung", "non-embedding N", "params", "tokens", "tokens/param", "epochs", "budgets",
                       f"{ref} end loss", *[f"{a}: end loss; speedup [95% seed CI]" for a in arms]],
             [r[0] for r in rows]),
            ("p", ("End loss: median end-of-schedule loss over the fresh seeds at the full budget. Speedup: at "
                   "the arm's fit budget fraction (the Fits table), its interval from the paired seed bootstrap.")),
            ("h2", "n-gram baselines (nats/token, the rung's validation tokens)"),
            ("table", ["rung", "unigram", "bigram", "trigram", f"{ref} end loss", f"{ref} below trigram"],
             [r[1] for r in rows])]


def report_blocks(summ: dict, plot: Path, ladder_dir: Path) -> list[tuple]:
    ns = [s["non_embedding_params"] for s in summ["sizes"]]
    span = f"from N = {min(ns):,} to {max(ns):,} non-embedding parameters ({max(ns) / min(ns):.1f}x)" if ns else ""
    blocks: list[tuple] = [
        ("h1", f"Scaling ladder {summ['ladder']}: {summ['description']}"),
        ("p", (f"Does each method's gain over {summ['reference']} shrink with scale? {len(ns)} rungs {span}, "
               f"{summ['tokens_per_param']:g} tokens per non-embedding parameter at the full budget, the "
               f"protocol of benchmark `{summ['base']}` at every rung.")),
        ("ul", [reading(a, f, summ["reference"]) for a, f in summ["fits"].items()] or ["no fit yet"]),
        *([("p", r)] if (r := regime_text(summ)) else []),
        ("img", os.path.relpath(plot, ladder_dir), "speedup vs non-embedding parameters, fitted lines", plot)]
    blocks += [("warn", f) for f in summ["flags"]]
    blocks += [("h2", "Marin's reading"), ("p", marin_text(summ))] + tables(summ)
    if summ["rung_flags"]:
        blocks += [("h3", "The rungs' own flags (each rung's report)"), ("ul", summ["rung_flags"])]
    blocks.append(("p", "Each rung's own report: " + ", ".join(
        f"`{os.path.relpath(s['dir'], ladder_dir)}`" for s in summ["sizes"])))
    return blocks


def build_ladder_report(ladder_dir: Path | str, reps: int = REPLICATES, seed: int = BOOT_SEED) -> dict[str, Path]:
    """Write summary.json, report.md, report.html and plots/speedup_vs_size.png into the ladder directory from
    ladder.json and the rungs' records; return their paths. RecordError: not a ladder directory."""
    ladder_dir = Path(ladder_dir)
    summ = ladder_summary(ladder_dir, reps, seed)
    (ladder_dir / "plots").mkdir(parents=True, exist_ok=True)
    plot = plot_speedups(summ, ladder_dir / "plots" / "speedup_vs_size.png")
    blocks = report_blocks(summ, plot, ladder_dir)
    out = {"md": ladder_dir / "report.md", "html": ladder_dir / "report.html",
           "summary": ladder_dir / "summary.json", "plot_speedup_vs_size": plot}
    atomic_write_text(out["md"], to_markdown(blocks))
    atomic_write_text(out["html"], to_html(blocks, f"Scaling ladder: {summ['ladder']}"))
    atomic_write_json(out["summary"], summ)
    return out
