"""The statistics of a benchmark, computed from its run records alone (docs: /work/shared/design/protocol.md).

Pure functions on RunRecords (scripts/bench_records.py): the target loss and the rule that gave it, steps /
tokens / FLOPs / training time to target, bootstrap CIs over seeds, speedup vs the reference arm, the
data-equivalent speedup from a power-law fit of the reference's curve, the local-optimality certificate,
one-sided Welch tests, optimizer overheads and plain-English caveats. scripts/report.py renders them.

    python -c "from scripts.bench_records import *; from scripts.bench_stats import analyze; \
d='results/bench_tiny'; print(analyze(read_bench(d), load_runs(d))['target'])"
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import optimize, stats

from scripts.bench_records import RunRecord, choose_best, first_reach

N_BOOT = 10_000  # bootstrap resamples
BOOT_SEED = 0  # fixed, so a report rebuilt from the same records prints the same intervals
CI_LEVEL = 0.95
FIT_SKIP = 0.10  # the power-law fit skips evaluations in the first 10% of the token budget (warm-up)
ALPHA = 0.05  # significance is claimed only for p < ALPHA
METRICS = ("steps", "steps_interp", "tokens", "flops", "time_s")  # the *-to-target figures, per seed


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def median(values) -> float | None:
    """Median that keeps inf (a seed that never reaches the target ranks last); None for no values."""
    return float(np.median(np.asarray(values, float))) if len(values) else None


def derive_target(bench: dict[str, Any], runs: list[RunRecord]) -> dict[str, Any]:
    """protocol.md "Target loss": declared in bench.json, else the reference arm's median final validation
    loss over the seed runs of its chosen setting. Returns {loss (None if not derivable yet), rule, detail}.
    """
    if bench.get("target_loss") is not None:
        return {"loss": float(bench["target_loss"]), "rule": "declared", "detail": "bench.json target_loss"}
    ref = bench["reference"]
    finals = [r.final_loss for r in runs if r.phase == "seed" and r.arm == ref]
    loss = median(finals)
    detail = f"median final val loss of the {len(finals)} seed runs of {ref} at its chosen setting"
    if loss is None or not math.isfinite(loss):
        return {"loss": None, "rule": "reference median", "detail": detail + " (none finite yet)"}
    return {"loss": loss, "rule": "reference median", "detail": detail}


def flops_per_step(run: RunRecord) -> tuple[float, bool]:
    """(training FLOPs per step, whether the optimizer's own FLOPs are included). Records written before
    summary.json had flops_per_step fall back to tokens/step x model FLOPs/token (optimizer not charged)."""
    s = run.summary
    if _finite(s.get("flops_per_step")):
        return float(s["flops_per_step"]), True
    if s.get("steps") and _finite(s.get("tokens")) and _finite(s.get("flops_per_token")):
        return s["tokens"] / s["steps"] * s["flops_per_token"], False
    return math.nan, False


def reach(run: RunRecord, target: float | None) -> dict[str, float]:
    """protocol.md "Steps to target": the first evaluation step with val loss <= target (no interpolation),
    and tokens / FLOPs / accumulated training time at that step; inf when never reached. steps_interp
    (reported separately, never instead) interpolates linearly between that evaluation and the one before."""
    hit = first_reach(run.evals, target)
    if hit is None:
        return dict.fromkeys(METRICS, math.inf)
    prev = [e for e in run.evals if e["step"] < hit["step"] and _finite(e["val_loss"])]
    interp = float(hit["step"])
    if prev and prev[-1]["val_loss"] > hit["val_loss"]:
        s0, l0 = prev[-1]["step"], prev[-1]["val_loss"]
        interp = s0 + (l0 - target) / (l0 - hit["val_loss"]) * (hit["step"] - s0)
    return {"steps": float(hit["step"]), "steps_interp": interp, "tokens": float(hit["tokens"]),
            "flops": hit["step"] * flops_per_step(run)[0], "time_s": float(hit["train_time_s"])}


def _resample(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x[rng.integers(0, len(x), size=(N_BOOT, len(x)))]


def bootstrap_ci(values) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the median over seeds (N_BOOT resamples, fixed seed). None when a value is
    not finite (a seed that never reached the target) or there are fewer than 2 seeds."""
    x = np.asarray(values, float)
    if len(x) < 2 or not np.isfinite(x).all():
        return None
    meds = np.median(_resample(x, np.random.default_rng(BOOT_SEED)), axis=1)
    lo, hi = np.quantile(meds, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return float(lo), float(hi)


def bootstrap_ratio(num, den) -> dict[str, Any] | None:
    """Speedup = mean(num) / mean(den) (protocol.md "Speedup vs AdamW": reference steps over arm steps) with
    a percentile bootstrap CI, resampling the seeds of each arm independently (no CI from a single seed).
    None unless every value is finite and positive."""
    x, y = np.asarray(num, float), np.asarray(den, float)
    if not len(x) or not len(y) or not (np.isfinite(x).all() and np.isfinite(y).all()) or (y <= 0).any():
        return None
    if min(len(x), len(y)) < 2:
        return {"point": float(x.mean() / y.mean()), "ci": None}
    rng = np.random.default_rng(BOOT_SEED)
    ratios = _resample(x, rng).mean(axis=1) / _resample(y, rng).mean(axis=1)
    lo, hi = np.quantile(ratios, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2])
    return {"point": float(x.mean() / y.mean()), "ci": (float(lo), float(hi))}


def median_curve(runs: list[RunRecord]) -> list[dict[str, float]]:
    """Validation curve over seeds: at each evaluation step, the median / min / max of the finite losses and
    the median tokens and training time (diverged evaluations drop out)."""
    by_step: dict[int, list[dict]] = {}
    for r in runs:
        for e in r.evals:
            if _finite(e["val_loss"]):
                by_step.setdefault(e["step"], []).append(e)
    return [{"step": s, "tokens": float(np.median([e["tokens"] for e in es])),
             "time_s": float(np.median([e["train_time_s"] for e in es])),
             "loss": float(np.median([e["val_loss"] for e in es])),
             "lo": min(e["val_loss"] for e in es), "hi": max(e["val_loss"] for e in es), "n": len(es)}
            for s, es in sorted(by_step.items())]


@dataclass
class PowerLaw:
    """L(tokens) = a + b * (tokens / budget)^(-c): the brief's a + b' * tokens^(-c) with b' = b * budget^c;
    normalising by the budget keeps the fit well conditioned."""

    a: float
    b: float
    c: float
    budget: float
    at_bound: bool = False  # a or c ended on a bound of the fit: the extrapolation is not to be trusted

    def loss(self, tokens):
        return self.a + self.b * (np.asarray(tokens, float) / self.budget) ** (-self.c)

    def tokens_for(self, loss: float) -> float:
        """Tokens at which the fitted curve reaches `loss`; inf at or below the asymptote a."""
        return math.inf if loss <= self.a else self.budget * ((loss - self.a) / self.b) ** (-1 / self.c)


def fit_power_law(curve: list[dict[str, float]]) -> PowerLaw | None:
    """Least-squares fit (scipy curve_fit, bounded: 0 <= a <= min loss, b >= 0, 0.01 <= c <= 5) to the
    evaluations after the first FIT_SKIP of the budget. None with fewer than 4 points or a failed fit."""
    budget = max((p["tokens"] for p in curve), default=0.0)
    pts = [(p["tokens"] / budget, p["loss"]) for p in curve if p["tokens"] > FIT_SKIP * budget]
    if len(pts) < 4:
        return None
    x, y = np.array(pts).T
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (a, b, c), _ = optimize.curve_fit(
                lambda t, a, b, c: a + b * t ** (-c), x, y,
                p0=(0.5 * y.min(), max(y[0] - y.min(), 1e-3), 0.5),
                bounds=([0.0, 0.0, 0.01], [y.min(), np.inf, 5.0]), maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    lo, hi = np.array([0.0, 0.01]), np.array([y.min(), 5.0])
    at_bound = bool(np.isclose([a, c], lo, rtol=1e-3, atol=1e-6).any()
                    or np.isclose([a, c], hi, rtol=1e-3).any())
    return PowerLaw(float(a), float(b), float(c), budget, at_bound) if b > 0 else None


def data_equivalent(fit: PowerLaw | None, loss: float | None, tokens: float | None) -> dict[str, Any]:
    """protocol.md "Speedup vs AdamW", data-equivalent form: reference tokens needed (from its power-law fit)
    to reach the arm's median final loss, over the arm's tokens. Flags extrapolation past the reference's
    budget; "unreachable" when the loss is at or below the fitted asymptote."""
    if fit is None or loss is None or not math.isfinite(loss) or not tokens:
        return {"status": "n/a", "speedup": None, "ref_tokens": None, "extrapolated": False}
    need = fit.tokens_for(loss)
    if not math.isfinite(need):
        return {"status": "unreachable", "speedup": None, "ref_tokens": math.inf, "extrapolated": True}
    extrapolated = need > fit.budget
    return {"status": "extrapolated" if extrapolated else "interpolated", "speedup": need / tokens,
            "ref_tokens": need, "extrapolated": extrapolated}


def numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value_str(v: Any) -> str:
    """A setting value as the report prints it: 0.003 -> '0.003', 1e-05 -> '1e-05', 'polar' -> 'polar'."""
    return f"{v:g}" if numeric(v) else str(v)


def same_value(a: Any, b: Any) -> bool:
    """Equality of setting values, tolerant to float round trips through YAML and JSON."""
    if numeric(a) and numeric(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)
    return a == b


def certificate(grid: dict[str, list], tune_runs: list[RunRecord], chosen: dict[str, Any]) -> list[dict]:
    """protocol.md rule 4, the local-optimality certificate: for each swept axis, the final losses of the tune
    trials that share the chosen setting's other-axis values, the immediate lower/upper neighbours, and an
    edge flag when the chosen value is the smallest or largest of a grid with more than one value. A
    categorical axis (strings, booleans) has no order: every other value is a neighbour, and no edge."""
    rows = []
    for axis, values in grid.items():
        if axis not in chosen:
            continue
        c = chosen[axis]
        ordered = all(map(numeric, [*values, c]))
        others = {a: v for a, v in chosen.items() if a != axis}
        line = sorted(((r.setting[axis], r.final_loss, r.trial) for r in tune_runs
                       if all(same_value(r.setting.get(a), v) for a, v in others.items())),
                      key=lambda t: t[0] if ordered else str(t[0]))
        grid_values = sorted(values, key=None if ordered else str)
        lower = upper = None
        if ordered:
            lower = max((v for v in grid_values if v < c and not same_value(v, c)), default=None)
            upper = min((v for v in grid_values if v > c and not same_value(v, c)), default=None)

        def loss_at(v, line=line):
            hits = [loss for value, loss, _ in line if v is not None and same_value(value, v)]
            return min(hits) if hits else None

        chosen_loss, neighbours = loss_at(c), [loss_at(lower), loss_at(upper)]
        known = [n for n in neighbours if n is not None] if ordered else \
            [loss for v, loss, _ in line if not same_value(v, c)]
        rows.append({"axis": axis, "grid": grid_values, "chosen": c, "chosen_loss": chosen_loss,
                     "lower": lower, "lower_loss": neighbours[0], "upper": upper, "upper_loss": neighbours[1],
                     "edge": ordered and len(grid_values) > 1 and (lower is None or upper is None),
                     "local_optimum": None if chosen_loss is None or not known
                     else all(chosen_loss <= n for n in known), "line": line})
    return rows


def welch_less(x, y) -> float | None:
    """p-value of the one-sided Welch t-test H1: mean(x) < mean(y) (scipy ttest_ind, equal_var=False). None
    when undefined: fewer than 2 finite values per side, or no variance on either side."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or len(y) < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    if x.var() == 0 and y.var() == 0:
        return None
    with warnings.catch_warnings():  # scipy warns of "precision loss" when one side is constant: harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False, alternative="less").pvalue)


def step_overhead(run: RunRecord) -> float | None:
    """protocol.md "Optimizer overhead": optimizer.step() time over the rest of the training time (forward +
    backward + data), both accumulated by train.py with device synchronisation."""
    o, t = run.summary.get("optimizer_step_time_s"), run.summary.get("train_time_s")
    return o / (t - o) if _finite(o) and _finite(t) and t > o else None


def _choose(arm: str, bench: dict, tune: list[RunRecord], warn: list[str]) -> dict:
    """The chosen trial per bench.json, cross-checked with choose_best (protocol.md rule 2) on the tune runs;
    ties are broken with the declared target only, as at tuning time a derived target does not exist yet."""
    best = choose_best(tune, bench.get("target_loss"))
    declared = (bench.get("chosen") or {}).get(arm)
    if declared is None:
        if best is not None:
            warn.append(f"{arm}: bench.json has no chosen setting; using choose_best's trial {best.trial}")
        return {"trial": best and best.trial, "setting": best.setting if best else None,
                "source": "choose_best", "best_trial": best and best.trial, "agree": True}
    agree = best is not None and best.trial == declared["trial"]
    if not agree:
        ranked = f"{best.trial} {best.setting}" if best else "no trial (all diverged)"
        warn.append(f"{arm}: bench.json chose trial {declared['trial']} {declared['setting']} but the tune "
                    f"records rank best {ranked}")
    return {"trial": declared["trial"], "setting": declared["setting"], "source": "bench.json",
            "best_trial": best and best.trial, "agree": agree}


def _arm(arm: str, bench: dict, runs: list[RunRecord], target: float | None, warn: list[str]) -> dict:
    """The per-arm statistics over its seed runs (protocol.md rule 4), plus its tune-run certificate."""
    decl = bench["arms"][arm]
    tune = [r for r in runs if r.arm == arm and r.phase == "tune"]
    seed = sorted((r for r in runs if r.arm == arm and r.phase == "seed"), key=lambda r: r.seed)
    chosen = _choose(arm, bench, tune, warn)
    for r in seed:
        setting = chosen["setting"] or {}
        if any(not same_value(r.setting.get(a), v) for a, v in setting.items()):
            warn.append(f"{arm}: seed run {r.trial} (seed {r.seed}) has setting {r.setting}, not the chosen "
                        f"{chosen['setting']}")
    per_seed = [{"seed": r.seed, "data_seed": r.data_seed, "final": r.final_loss, "diverged": r.diverged,
                 "min": r.summary.get("min_val_loss"), "tokens_run": r.summary.get("tokens"),
                 **reach(r, target)} for r in seed]
    out = {"arm": arm, "optimizer": decl.get("optimizer", arm), "description": decl.get("description", ""),
           "grid": decl["grid"], "chosen": chosen, "n_seed": len(seed), "n_tune": len(tune),
           "per_seed": per_seed,
           "final": {"median": median([s["final"] for s in per_seed]),
                     "ci": bootstrap_ci([s["final"] for s in per_seed])},
           "min": median([s["min"] for s in per_seed if _finite(s["min"])]),
           "tokens_run": median([s["tokens_run"] for s in per_seed if _finite(s["tokens_run"])]),
           "diverged": {"tune": sum(r.diverged for r in tune), "seed": sum(r.diverged for r in seed)},
           "flops_charge_optimizer": bool(seed) and all(flops_per_step(r)[1] for r in seed),
           "overhead": median([o for o in map(step_overhead, seed) if o is not None]),
           "state_bytes": median([r.summary["optimizer_state_bytes"] for r in seed
                                  if _finite(r.summary.get("optimizer_state_bytes"))]),
           "certificate": certificate(decl["grid"], tune, chosen["setting"]) if chosen["setting"] else [],
           "curve": median_curve(seed)}
    for m in METRICS:
        vals = [s[m] for s in per_seed]
        out[m] = {"median": median(vals), "ci": bootstrap_ci(vals), "reached": sum(map(math.isfinite, vals))}
    return out


def _tests(a: dict, b: dict) -> dict[str, Any]:
    """protocol.md rule 5: one-sided Welch tests of arm a vs arm b on final loss at equal steps, and on steps
    to target only where both reach it in every seed."""
    steps_a, steps_b = [s["steps"] for s in a["per_seed"]], [s["steps"] for s in b["per_seed"]]
    both = all(map(math.isfinite, steps_a + steps_b)) and steps_a and steps_b
    return {"vs": b["arm"], "n": (a["n_seed"], b["n_seed"]),
            "p_final": welch_less([s["final"] for s in a["per_seed"]],
                                  [s["final"] for s in b["per_seed"]]),
            "p_steps": welch_less(steps_a, steps_b) if both else None}


def analyze(bench: dict[str, Any], runs: list[RunRecord]) -> dict[str, Any]:
    """Everything the report shows: {target, reference, arms: {arm: stats}, ref_fit, warnings}."""
    warn: list[str] = []
    target = derive_target(bench, runs)
    ref, muon_ref = bench["reference"], bench.get("muon_reference")
    arms = {arm: _arm(arm, bench, runs, target["loss"], warn) for arm in bench["arms"]}
    fit = fit_power_law(arms[ref]["curve"]) if ref in arms else None
    for name, a in arms.items():
        a["tests"], a["speedup"], a["data_eq"] = [], None, None
        if name == ref or ref not in arms or not a["n_seed"]:
            continue
        r = arms[ref]
        a["speedup"] = bootstrap_ratio([s["steps"] for s in r["per_seed"]],
                                       [s["steps"] for s in a["per_seed"]])
        a["data_eq"] = data_equivalent(fit, a["final"]["median"], a["tokens_run"])
        both = a["state_bytes"] and r["state_bytes"]
        a["state_ratio"] = a["state_bytes"] / r["state_bytes"] if both else None
        a["tests"].append(_tests(a, r))
        if name in bench.get("muon_variants", []) and muon_ref in arms:
            a["tests"].append(_tests(a, arms[muon_ref]))
    if ref in arms:
        arms[ref]["state_ratio"] = 1.0 if arms[ref]["state_bytes"] else None
    return {"target": target, "reference": ref, "muon_reference": muon_ref, "arms": arms, "ref_fit": fit,
            "warnings": warn}


def caveats(bench: dict[str, Any], analysis: dict[str, Any]) -> list[str]:
    """Plain-English warnings generated from the numbers: thin seeds, unequal tuning budgets, edge-of-grid
    choices, unreached targets, extrapolated or impossible data-equivalent speedups, divergences, FLOPs that
    do not charge the optimizer, missing state memory."""
    out, ref, arms, fit = [], analysis["reference"], analysis["arms"], analysis["ref_fit"]
    if fit is not None and fit.at_bound:
        out.append(f"The power-law fit of {ref}'s curve ended on a bound of its parameters (a = "
                   f"{fit.a:.4g}, c = {fit.c:.4g}): its curve is not power-law-like here, so every "
                   "data-equivalent speedup is unreliable.")
    n_seeds = {a["n_seed"] for a in arms.values() if a["n_seed"]}
    if min(n_seeds, default=3) < 3:
        who = "Every arm has" if len(n_seeds) == 1 else "Some arm has"
        out.append(f"{who} only {min(n_seeds)} seed runs (protocol.md asks for N >= 3): the bootstrap CIs "
                   "can take only a few distinct values and are crude, and the t-tests have little power; a "
                   f"p-value >= {ALPHA} says the data cannot tell, not that the optimizers are equal.")
    for name, a in arms.items():
        if not a["n_seed"]:
            out.append(f"{name} has no complete seed runs yet: no statistics, speedup or test for it.")
        if a["n_tune"] != bench.get("trials", a["n_tune"]):
            out.append(f"{name} has {a['n_tune']} complete tuning trials of the {bench['trials']} declared: "
                       "the tuning budgets are not equal (yet).")
        for c in a["certificate"]:
            if c["edge"]:
                side = "upper" if c["upper"] is None else "lower"
                grid = ", ".join(map(value_str, c["grid"]))
                out.append(f"{name}: the chosen {c['axis']} of {value_str(c['chosen'])} is at the {side} "
                           f"edge of its grid [{grid}]: the optimum may lie beyond it; widen the grid.")
            if c["local_optimum"] is False:
                out.append(f"{name}: on {c['axis']} a neighbour of the chosen {value_str(c['chosen'])} has a "
                           "lower final loss: the chosen setting is not a local optimum on this axis.")
        k, n = a["steps"]["reached"], a["n_seed"]
        if n and k < n:
            by_rule = name == ref and analysis["target"]["rule"] == "reference median"
            why = (" (by construction of the reference-median target rule, about half of the reference's "
                   "seeds end above the target)") if by_rule else ""
            out.append(f"{name} reaches the target in {k} of {n} seed runs{why}: its steps to target have no "
                       "CI" + ("" if name == ref else ", and its speedup in steps is undefined") + ".")
        elif n and name != ref and a["speedup"] is None and arms.get(ref, {}).get("n_seed"):
            out.append(f"{name}: the speedup in steps is undefined because {ref} does not reach the target "
                       "in every seed; the data-equivalent speedup is shown instead.")
        de = a.get("data_eq") or {}
        if de.get("status") == "extrapolated" and a["speedup"] is None:  # only where it is the headline
            out.append(f"{name}'s data-equivalent speedup extrapolates {ref}'s power-law fit to "
                       f"{de['ref_tokens'] / fit.budget:.2f}x its token budget: treat it as an estimate.")
        elif de.get("status") == "unreachable":
            out.append(f"{name}'s median final loss {a['final']['median']:.4f} is at or below the asymptote "
                       f"{fit.a:.4f} of {ref}'s fitted power law: by the fit, no amount of {ref} data "
                       "reaches it.")
        if a["diverged"]["tune"] or a["diverged"]["seed"]:
            out.append(f"{name}: {a['diverged']['tune']} of {a['n_tune']} tuning trials and "
                       f"{a['diverged']['seed']} of {n} seed runs diverged (they count in the tuning budget, "
                       "protocol.md rule 6).")
        if n and not a["flops_charge_optimizer"]:
            out.append(f"{name}: its records carry no flops_per_step, so its FLOPs to target count model "
                       "FLOPs only (the optimizer's own FLOPs are not charged).")
        if n and a["state_bytes"] is None:
            out.append(f"{name}: its records carry no optimizer_state_bytes; no state memory ratio.")
    return out
