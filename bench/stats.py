"""Statistics of a benchmark report (protocol version 2).

Functions (a "values" argument: a sequence of floats; None or non-finite entries are diverged/missing runs):

- ``interval``: mean, median, sd and a confidence interval of the mean (Student t for n < 8, else BCa).
- ``paired``: paired comparison of an arm with the reference over common seeds (t interval, t-test, MDD).
- ``min_detectable_difference``: smallest true mean difference a paired t-test detects with the given power.
- ``welch``: Welch's unequal-variance t-test p-value, for when pairing by seed is impossible.
- ``holm``: Holm-Bonferroni step-down adjusted p-values.
- ``expected_best_of_k``: Dodge et al. (2019) expected best (minimum) loss over k of n trials.
- ``loglinear_crossing``: the budget at which a loss curve (linear in log budget) first reaches a target.
- ``data_equivalent_speedup``: Marin's data-equivalent speedup of an arm over a reference curve.
- ``exchange_rate``: the reference's loss per step near a target (minus the slope dL/dB).
- ``track3_pairwise``: the modded-nanogpt optimization track's step-adjusted pairwise z statistic.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from scipy import optimize, stats

BCA_MIN_N = 8  # interval(): BCa bootstrap from this many finite values on, Student t below
BCA_RESAMPLES = 10_000
TRACK3_RATE = 0.0045 / 100  # loss per step: the track's "0.0045 per 100 steps"
TRACK3_SIGMA = 0.0013  # the track's assumed per-run sd of the final val loss
TRACK3_SOURCE = ("KellerJordan/modded-nanogpt, records/track_3_optimization/README.md, "
                 "section 'Pairwise statistical significance' (commit f411b3d3)")

Value = float | None


def _finite(values: Sequence[Value]) -> np.ndarray:
    """The finite entries of ``values`` as a float array (None and nan/inf dropped)."""
    return np.array([float(v) for v in values if v is not None and math.isfinite(v)], dtype=float)


def _t_bounds(mean: float, sd: float, n: int, level: float) -> tuple[float, float]:
    """mean -+ t_{(1+level)/2, n-1} sd / sqrt(n)."""
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def interval(values: Sequence[Value], level: float = 0.95) -> dict | None:
    """Summary and ``level`` confidence interval of the mean of the finite values; None when n < 2.

    n < ``BCA_MIN_N``: Student t, mean -+ t_{(1+level)/2, n-1} sd/sqrt(n) (sd with ddof=1), method "t".
    n >= ``BCA_MIN_N``: bias-corrected and accelerated bootstrap of the mean (Efron 1987;
    ``scipy.stats.bootstrap``, 10,000 resamples, ``np.random.default_rng(0)`` so that a rebuilt report prints
    the same numbers), method "bca"; falls back to t (method "t") when BCa is nan (e.g. constant data).
    """
    x = _finite(values)
    n = len(x)
    if n < 2:
        return None
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    lo = hi = math.nan
    method = "t"
    if n >= BCA_MIN_N:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on degenerate (constant) data: the fallback below
            res = stats.bootstrap((x,), np.mean, n_resamples=BCA_RESAMPLES, confidence_level=level,
                                  method="BCa", vectorized=True, rng=np.random.default_rng(0))
        lo, hi, method = float(res.confidence_interval.low), float(res.confidence_interval.high), "bca"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = _t_bounds(mean, sd, n, level)
        method = "t"
    return {"n": n, "mean": mean, "median": float(np.median(x)), "sd": sd, "lo": lo, "hi": hi,
            "method": method, "of": "mean"}


def paired(arm: Mapping[Hashable, Value], ref: Mapping[Hashable, Value], alternative: str = "less",
           level: float = 0.95, alpha: float = 0.05, power: float = 0.8) -> dict | None:
    """Paired comparison over the seeds present and finite in both ``arm`` and ``ref``; None when n < 2.

    d_s = arm_s - ref_s; mean_diff and sd_diff (ddof=1) of d; lo/hi: two-sided ``level`` t interval of the
    mean difference; t = mean_diff / (sd_diff / sqrt(n)) and p: paired t-test (``scipy.stats.ttest_rel``) with
    ``alternative`` ("less": arm < ref, the arm's loss is lower); mdd: ``min_detectable_difference``
    (one-sided unless alternative is "two-sided"). When every difference is identical (sd 0): t = +-inf (0 if
    the difference is 0); p = 0.0 if the difference lies on the tested side, 1.0 if not, 0.5 if zero (1.0 for
    "two-sided"); mdd 0.
    """
    seeds = sorted(s for s in arm.keys() & ref.keys() if all(
        v is not None and math.isfinite(v) for v in (arm[s], ref[s])))
    n = len(seeds)
    if n < 2:
        return None
    a = np.array([float(arm[s]) for s in seeds])  # type: ignore[arg-type]
    r = np.array([float(ref[s]) for s in seeds])  # type: ignore[arg-type]
    d = a - r
    mean = float(d.mean())
    constant = bool(np.all(d == d[0]))
    sd = 0.0 if constant else float(d.std(ddof=1))
    lo, hi = _t_bounds(mean, sd, n, level)
    if constant:
        t = math.copysign(math.inf, mean) if mean != 0 else 0.0
        on_side = {"less": mean < 0, "greater": mean > 0, "two-sided": mean != 0}[alternative]
        p = 0.0 if on_side else (1.0 if mean != 0 or alternative == "two-sided" else 0.5)
    else:
        res = stats.ttest_rel(a, r, alternative=alternative)
        t, p = float(res.statistic), float(res.pvalue)
    mdd = min_detectable_difference(sd, n, alpha, power, one_sided=alternative != "two-sided")
    return {"n": n, "seeds": seeds, "mean_diff": mean, "sd_diff": sd, "lo": lo, "hi": hi, "t": t, "p": p,
            "mdd": mdd}


def min_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8,
                              one_sided: bool = True) -> float:
    """Smallest true mean difference delta that a paired (one-sample) t-test on n differences of sd ``sd``
    detects with probability ``power`` at level ``alpha``; inf for n < 2, 0 for sd 0.

    Solves P(T' > t_{1-a, n-1}) = power by ``scipy.optimize.brentq``, where T' ~ noncentral t
    (``scipy.stats.nct``) with df n-1 and noncentrality delta sqrt(n)/sd, and a = alpha (one-sided) or alpha/2
    (two-sided, the far tail ignored). For large n, delta ~ (z_{1-a} + z_power) sd / sqrt(n).
    """
    if n < 2 or not math.isfinite(sd):
        return math.inf
    if sd == 0:
        return 0.0
    df = n - 1
    crit = float(stats.t.ppf(1 - (alpha if one_sided else alpha / 2), df))

    def gap(ncp: float) -> float:
        return float(stats.nct.sf(crit, df, ncp)) - power

    if gap(0.0) >= 0:  # power <= a: detected with no difference at all
        return 0.0
    hi = crit + float(stats.norm.ppf(power)) + 1.0
    while gap(hi) < 0:
        hi *= 2
    ncp = optimize.brentq(gap, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return ncp * sd / math.sqrt(n)


def welch(x: Sequence[Value], y: Sequence[Value], alternative: str = "less") -> float | None:
    """Welch's unequal-variance t-test p-value of x against y (``scipy.stats.ttest_ind(equal_var=False)``,
    Welch-Satterthwaite df) with ``alternative`` ("less": mean x < mean y). Only for when pairing by seed is
    impossible. None when either side has < 2 finite values, or when the test is undefined (both constant)."""
    a, b = _finite(x), _finite(y)
    if len(a) < 2 or len(b) < 2:
        return None
    p = float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)
    return p if math.isfinite(p) else None


def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm (1979) step-down adjusted p-values over the non-None entries, in the input's key order.

    With the m non-None p sorted ascending (stably, ties keep input order) as p_(1) <= ... <= p_(m):
    adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)). None stays None.
    """
    keys = [k for k, p in pvalues.items() if p is not None]
    p = np.array([float(pvalues[k]) for k in keys], dtype=float)  # type: ignore[arg-type]
    if np.any(~np.isfinite(p) | (p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1]: {dict(pvalues)}")
    m = len(p)
    order = np.argsort(p, kind="stable")
    adj_sorted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adjusted: dict[str, float | None] = {k: None for k in pvalues}
    for rank, idx in enumerate(order):
        adjusted[keys[idx]] = float(adj_sorted[rank])
    return adjusted


def expected_best_of_k(losses: Sequence[Value], diverged_loss: float) -> list[float]:
    """Expected minimum loss of k trials drawn without replacement from the n trials, for k = 1..n (Dodge et
    al. 2019, "Show Your Work", expected validation performance, here for minimization).

    E[min of a random k-subset] = sum_{i=1}^{n} v_(i) C(n-i, k-1) / C(n, k), v sorted ascending. None or
    non-finite trials (diverged) count as trials with loss ``diverged_loss`` (the caller passes the loss at
    initialization). Binomials are exact integers (``math.comb``); their ratio is a correctly rounded float.
    """
    if not math.isfinite(diverged_loss):
        raise ValueError(f"diverged_loss must be finite, got {diverged_loss}")
    v = sorted(float(x) if x is not None and math.isfinite(x) else float(diverged_loss) for x in losses)
    n = len(v)
    return [math.fsum(v[i - 1] * (math.comb(n - i, k - 1) / math.comb(n, k)) for i in range(1, n + 1))
            for k in range(1, n + 1)]


def _curve(budgets: Sequence[float], losses: Sequence[Value]) -> list[tuple[float, float]]:
    """The (budget, loss) points with a finite loss; budgets must be positive and strictly ascending."""
    b = [float(x) for x in budgets]
    if len(b) != len(losses) or any(x <= 0 for x in b) or any(y <= x for x, y in itertools.pairwise(b)):
        raise ValueError(f"budgets must be positive, strictly ascending, one per loss: {budgets}, {losses}")
    return [(x, float(y)) for x, y in zip(b, losses) if y is not None and math.isfinite(y)]


def _first_fall(points: list[tuple[float, float]], target: float) -> int | None:
    """Where the curve first falls to <= target: -1 if at its first point, i if within segment (i, i+1),
    None if never."""
    if points and points[0][1] <= target:
        return -1
    return next((i for i in range(len(points) - 1) if points[i + 1][1] <= target), None)


def _loglinear_at(p0: tuple[float, float], p1: tuple[float, float], loss: float) -> float | None:
    """Budget at which the line through p0, p1 in (log budget, loss) has ``loss``; None if its slope is >= 0
    (it cannot be used to extrapolate)."""
    (b0, l0), (b1, l1) = p0, p1
    slope = (l1 - l0) / (math.log(b1) - math.log(b0))
    if slope >= 0:
        return None
    return math.exp(math.log(b0) + (loss - l0) / slope)


def loglinear_crossing(budgets: Sequence[float], losses: Sequence[Value], target: float) -> dict:
    """Budget at which the piecewise curve through (log budget, loss) first falls to <= ``target``.

    Missing (None / non-finite) losses are skipped, interpolating between their available neighbours. Within
    segment (B0, L0)-(B1, L1) with L0 > target >= L1: B = exp(log B0 + (target - L0)/(L1 - L0) log(B1/B0)),
    where "interpolated". If the smallest available budget already has loss <= target: that budget, where
    "at_smallest" (a bound: reached at or before it). Not reached within the largest budget: value None.
    """
    points = _curve(budgets, losses)
    i = _first_fall(points, target)
    if i is None:
        return {"value": None, "reached": False, "where": "not_reached"}
    if i == -1:
        return {"value": points[0][0], "reached": True, "where": "at_smallest"}
    (b0, l0), (b1, l1) = points[i], points[i + 1]
    value = b1 if l1 == target else math.exp(math.log(b0) + (target - l0) / (l1 - l0) * math.log(b1 / b0))
    return {"value": value, "reached": True, "where": "interpolated"}


def data_equivalent_speedup(ref_budgets: Sequence[float], ref_losses: Sequence[Value], arm_budget: float,
                            arm_loss: float | None) -> dict:
    """Marin's data-equivalent speedup: B_ref / arm_budget, B_ref the budget at which the reference's
    loss-vs-budget curve (linear in log budget between its budgets) equals ``arm_loss``.

    B_ref is where the reference first falls to <= arm_loss scanning from its smallest budget (so a
    non-monotone curve uses its first crossing). arm_loss above the reference's loss at its smallest budget:
    extrapolated back along the first segment; below every reference loss: extrapolated forward along the
    last segment (extrapolated True). An extrapolating segment with slope >= 0, fewer than 2 reference points
    or a missing arm_loss give value None.
    """
    if arm_budget <= 0:
        raise ValueError(f"arm_budget must be positive, got {arm_budget}")
    points = _curve(ref_budgets, ref_losses)
    none = {"value": None, "ref_budget": None, "extrapolated": False}
    if arm_loss is None or not math.isfinite(arm_loss) or len(points) < 2:
        return none
    i = _first_fall(points, arm_loss)
    extrapolated = i is None or (i == -1 and points[0][1] < arm_loss)
    if i is None:
        b_ref = _loglinear_at(points[-2], points[-1], arm_loss)
    elif i == -1:
        b_ref = _loglinear_at(points[0], points[1], arm_loss) if extrapolated else points[0][0]
    else:
        b_ref = loglinear_crossing([b for b, _ in points], [loss for _, loss in points], arm_loss)["value"]
    if b_ref is None:
        return {**none, "extrapolated": extrapolated}
    return {"value": b_ref / arm_budget, "ref_budget": b_ref, "extrapolated": extrapolated}


def exchange_rate(budgets: Sequence[float], losses: Sequence[Value], target: float) -> float | None:
    """Loss per step near ``target`` on the reference's curve: -(L1 - L0)/(B1 - B0), linear in B (not log), of
    the segment where the curve first falls to <= target (as in ``loglinear_crossing``); the first segment if
    the smallest budget already reaches it, the last if it is never reached. Positive for a decreasing curve.
    None with fewer than 2 available points.
    """
    points = _curve(budgets, losses)
    if len(points) < 2:
        return None
    i = _first_fall(points, target)
    i = len(points) - 2 if i is None else max(i, 0)
    (b0, l0), (b1, l1) = points[i], points[i + 1]
    return -(l1 - l0) / (b1 - b0)


def track3_pairwise(arm_losses: Sequence[Value], ref_losses: Sequence[Value], arm_steps: float,
                    ref_steps: float, rate: float, sigma: float | None = None) -> dict:
    """The modded-nanogpt optimization track ("track 3") pairwise comparison of an arm with a reference.

    Source: KellerJordan/modded-nanogpt, records/track_3_optimization/README.md, "Pairwise statistical
    significance". The track requires ``(final_loss_diff + exp_stepbased_loss_diff) / (1/n1 + 1/n2)**0.5 >=
    0.004``, with final_loss_diff = mean(old) - mean(new), exp_stepbased_loss_diff = (old_steps - new_steps)
    * 0.0045/100, and 0.004 = 3.09 sigma for its assumed sigma = 0.0013 (a one-sided z-test at p < .001).

    Here, with arm = new and ref = old (the sign flipped so that negative favours the arm, like ``paired``):
    adjusted_diff = (mean(arm) - mean(ref)) + rate (arm_steps - ref_steps), ``rate`` in loss per step
    (``TRACK3_RATE`` = 0.0045/100 for the track); z = adjusted_diff / (sigma sqrt(1/n_a + 1/n_r)); p = Phi(z),
    the one-sided normal p-value for "the arm is better". The track's criterion is z <= -0.004/sigma.
    ``sigma`` None: the pooled sample sd, sqrt(((n_a-1) s_a^2 + (n_r-1) s_r^2) / (n_a + n_r - 2)). Means use
    the finite losses only (the track has no rule for diverged runs: the caller decides whether to allow
    them); adjusted_diff, z, p are None when a side has no finite loss or sigma is undefined or 0.
    """
    a, r = _finite(arm_losses), _finite(ref_losses)
    out = {"adjusted_diff": None, "z": None, "p": None, "sigma": sigma, "rate": rate, "source": TRACK3_SOURCE}
    if len(a) == 0 or len(r) == 0:
        return out
    out["adjusted_diff"] = float(a.mean() - r.mean()) + rate * (arm_steps - ref_steps)
    if sigma is None and len(a) + len(r) > 2:
        ss = float(((a - a.mean()) ** 2).sum() + ((r - r.mean()) ** 2).sum())
        sigma = out["sigma"] = math.sqrt(ss / (len(a) + len(r) - 2))
    if sigma is None or not sigma > 0:
        return out
    z = out["adjusted_diff"] / (sigma * math.sqrt(1 / len(a) + 1 / len(r)))
    out.update(z=z, p=float(stats.norm.cdf(z)))
    return out
