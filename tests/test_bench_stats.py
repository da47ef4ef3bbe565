"""Tests of bench/stats.py on constructed data with hand-computed answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from bench.stats import (
    BCA_MIN_N,
    TRACK3_RATE,
    TRACK3_SIGMA,
    data_equivalent_speedup,
    exchange_rate,
    expected_best_of_k,
    holm,
    interval,
    loglinear_crossing,
    min_detectable_difference,
    paired,
    track3_pairwise,
    welch,
)

T_975_3 = 3.182446305284263  # t_{0.975, 3}


# ---- interval ----------------------------------------------------------------------------------------------

def test_interval_t_by_hand():
    r = interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # deviations -1.5, -.5, .5, 1.5: squares sum to 5, over n-1 = 3
    half = T_975_3 * sd / 2  # sd / sqrt(4)
    assert r["n"] == 4 and r["method"] == "t" and r["of"] == "mean"
    assert r["mean"] == pytest.approx(2.5) and r["median"] == pytest.approx(2.5)
    assert r["sd"] == pytest.approx(sd, rel=1e-12)
    assert r["lo"] == pytest.approx(2.5 - half, rel=1e-12)  # 0.44571...
    assert r["hi"] == pytest.approx(2.5 + half, rel=1e-12)  # 4.55428...
    assert r["lo"] == pytest.approx(0.4457397432, abs=1e-9)  # 2.5 - 3.1824463 * 0.6454972


def test_interval_drops_missing_and_needs_two():
    r = interval([1.0, None, float("nan"), float("inf"), 3.0])
    assert r["n"] == 2 and r["mean"] == 2.0
    half = 12.706204736174704 * math.sqrt(2) / math.sqrt(2)  # t_{0.975,1} * sd / sqrt(2), sd = sqrt(2)
    assert (r["lo"], r["hi"]) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-12)
    assert interval([1.0, None]) is None and interval([]) is None


def test_interval_bca_from_eight():
    assert BCA_MIN_N == 8
    values = [3.1, 3.4, 2.9, 3.0, 3.6, 3.2, 3.3, 2.8]
    assert interval(values[:7])["method"] == "t"
    r = interval(values)
    assert r["method"] == "bca" and r["n"] == 8
    assert r["mean"] == pytest.approx(3.1625)
    assert r["median"] == pytest.approx(3.15)
    assert r["lo"] < r["mean"] < r["hi"]
    t_lo, t_hi = r["mean"] + np.array([-1, 1]) * stats.t.ppf(0.975, 7) * r["sd"] / math.sqrt(8)
    assert r["lo"] != pytest.approx(t_lo) and r["hi"] - r["lo"] < t_hi - t_lo  # bootstrap, not t; narrower
    assert interval(values) == r  # fixed generator: a rebuilt report prints the same numbers


def test_interval_bca_constant_falls_back_to_t():
    r = interval([2.0] * 9)
    assert r["method"] == "t" and r["sd"] == 0.0
    assert r["lo"] == pytest.approx(2.0) and r["hi"] == pytest.approx(2.0)


def test_t_interval_coverage_by_simulation():
    reps, n = 4000, 5
    samples = np.random.default_rng(1234).normal(loc=1.0, scale=2.0, size=(reps, n))
    covered = 0
    for s in samples:
        r = interval(s.tolist())
        covered += r["lo"] <= 1.0 <= r["hi"]
    tol = 4 * math.sqrt(0.95 * 0.05 / reps)  # 4 binomial standard errors = 0.0138
    assert abs(covered / reps - 0.95) < tol


# ---- holm --------------------------------------------------------------------------------------------------

def test_holm_known_set():
    # m = 4; ascending: d .005 (x4 = .02), a .01 (x3 = .03), c .03 (x2 = .06), b .04 (x1 = .04 -> max .06)
    adj = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert list(adj) == ["a", "b", "c", "d"]
    assert list(adj.values()) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_none_passthrough_and_cap():
    # m = 3 (None skipped): .6 x3 = 1.8 -> 1, .8 x2 = 1.6 -> 1, .9 x1 = .9 -> running max 1
    adj = holm({"a": 0.6, "b": 0.8, "c": None, "d": 0.9})
    assert adj == {"a": 1.0, "b": 1.0, "c": None, "d": 1.0}
    # m = 2: .2 x2 = .4, .7 x1 = .7; ties: .02 x2 = .04 and .02 x1 -> max .04
    assert holm({"x": 0.7, "y": None, "z": 0.2}) == pytest.approx({"x": 0.7, "y": None, "z": 0.4})
    assert holm({"p": 0.02, "q": 0.02}) == pytest.approx({"p": 0.04, "q": 0.04})
    assert holm({"only": None}) == {"only": None}


# ---- paired, welch -----------------------------------------------------------------------------------------

def test_paired_by_hand_common_seeds_only():
    arm = {1: 3.0, 2: 3.1, 3: 2.9, 4: 3.3, 5: 9.9, 8: float("nan")}
    ref = {1: 3.2, 2: 3.2, 3: 3.0, 4: 3.3, 6: 1.0, 7: None, 8: 3.0}
    r = paired(arm, ref)
    assert r["n"] == 4 and r["seeds"] == [1, 2, 3, 4]
    d = np.array([-0.2, -0.1, -0.1, 0.0])  # mean -.1; deviations -.1, 0, 0, .1: ss .02, sd sqrt(.02/3)
    mean, sd = -0.1, math.sqrt(0.02 / 3)
    t = mean / (sd / math.sqrt(4))  # = -sqrt(6)
    assert t == pytest.approx(-math.sqrt(6))
    assert r["mean_diff"] == pytest.approx(mean) and r["sd_diff"] == pytest.approx(sd)
    assert r["sd_diff"] == pytest.approx(d.std(ddof=1))
    assert r["t"] == pytest.approx(t)
    assert r["p"] == pytest.approx(stats.t.cdf(t, 3))  # one-sided "less": P(T_3 <= t) = 0.0458...
    assert r["p"] == pytest.approx(0.04586, abs=1e-4)
    assert (r["lo"], r["hi"]) == pytest.approx((mean - T_975_3 * sd / 2, mean + T_975_3 * sd / 2))
    assert r["mdd"] == pytest.approx(min_detectable_difference(sd, 4))
    assert paired(arm, ref, alternative="greater")["p"] == pytest.approx(1 - stats.t.cdf(t, 3))


def test_paired_constant_difference_and_too_few():
    ref = {1: 1.0, 2: 2.0, 3: 3.0}
    lower = {s: v - 0.5 for s, v in ref.items()}  # every difference exactly -0.5
    r = paired(lower, ref)
    assert r["sd_diff"] == 0.0 and r["mean_diff"] == -0.5 and r["mdd"] == 0.0
    assert r["p"] == 0.0 and r["t"] == -math.inf and r["lo"] == r["hi"] == -0.5
    assert paired(lower, ref, alternative="greater")["p"] == 1.0
    assert paired(ref, dict(ref))["p"] == 0.5
    assert paired({1: 1.0, 2: 2.0}, {1: 1.5, 3: 2.0}) is None  # one common seed


def test_welch_by_hand():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, None]
    # var x = 5/3, var y = 20/3, n = 4: se^2 = 5/12 + 20/12 = 25/12; t = (2.5 - 5)/sqrt(25/12) = -sqrt(3)
    # Welch-Satterthwaite df = (25/12)^2 / ((5/12)^2/3 + (20/12)^2/3) = 1875/425
    assert welch(x, y) == pytest.approx(stats.t.cdf(-math.sqrt(3), 1875 / 425))
    assert welch(x, [1.0, None]) is None


# ---- min_detectable_difference -----------------------------------------------------------------------------

@pytest.mark.parametrize("n,one_sided", [(2, True), (5, True), (10, False), (30, True)])
def test_mdd_has_the_asked_power(n, one_sided):
    sd, alpha, power = 0.01, 0.05, 0.8
    delta = min_detectable_difference(sd, n, alpha, power, one_sided=one_sided)
    crit = stats.t.ppf(1 - (alpha if one_sided else alpha / 2), n - 1)
    assert stats.nct.sf(crit, n - 1, delta * math.sqrt(n) / sd) == pytest.approx(power, abs=1e-9)


def test_mdd_normal_approximation_and_edges():
    sd, n = 0.02, 400
    approx = (stats.norm.ppf(0.95) + stats.norm.ppf(0.8)) * sd / math.sqrt(n)  # 0.0024865
    assert min_detectable_difference(sd, n) == pytest.approx(approx, rel=0.01)
    assert min_detectable_difference(sd, 1) == math.inf
    assert min_detectable_difference(0.0, 5) == 0.0
    assert min_detectable_difference(sd, 5) > min_detectable_difference(sd, 10)


# ---- expected_best_of_k ------------------------------------------------------------------------------------

def test_expected_best_of_k_by_hand():
    # sorted 1, 2, 3; C(3,k): k=1 weights 1/3 each; k=2 weights C(2,1)/3, C(1,1)/3, 0; k=3 weight 1 on the min
    assert expected_best_of_k([3.0, 1.0, 2.0], diverged_loss=10.0) == pytest.approx([2.0, 4 / 3, 1.0])
    # diverged trials count, at diverged_loss: sorted 1, 10, 10 -> k=1: 7, k=2: 2/3 + 10/3 = 4, k=3: 1
    assert expected_best_of_k([None, 1.0, float("nan")], diverged_loss=10.0) == pytest.approx([7.0, 4.0, 1.0])
    assert expected_best_of_k([], 10.0) == []


def test_expected_best_of_k_large_n_exact():
    v = np.random.default_rng(0).uniform(size=300)
    e = expected_best_of_k(v.tolist(), diverged_loss=10.0)  # C(300, 150) ~ 1e89: exact ints, no overflow
    assert e[0] == pytest.approx(v.mean()) and e[-1] == pytest.approx(v.min())
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(e))


# ---- loglinear_crossing, data_equivalent_speedup, exchange_rate -------------------------------------------

B, L = [100, 200, 400], [4.0, 3.5, 3.2]


def test_loglinear_crossing():
    # 3.35 is halfway from 3.5 to 3.2, halfway in log budget from 200 to 400: 200 * 2**0.5
    r = loglinear_crossing(B, L, 3.35)
    assert r["where"] == "interpolated" and r["reached"] is True
    assert r["value"] == pytest.approx(200 * 2**0.5) and r["value"] == pytest.approx(282.842712, abs=1e-6)
    assert loglinear_crossing(B, L, 3.5)["value"] == pytest.approx(200.0)
    assert loglinear_crossing(B, L, 4.5) == {"value": 100.0, "reached": True, "where": "at_smallest"}
    assert loglinear_crossing(B, L, 3.0) == {"value": None, "reached": False, "where": "not_reached"}
    # a missing middle point: interpolate 100..400, 3.5 halfway -> 100 * 4**0.5
    assert loglinear_crossing(B, [4.0, None, 3.0], 3.5)["value"] == pytest.approx(200.0)
    with pytest.raises(ValueError):
        loglinear_crossing([200, 100], [4.0, 3.0], 3.5)


def test_data_equivalent_speedup():
    r = data_equivalent_speedup(B, L, arm_budget=200, arm_loss=3.35)
    assert r["ref_budget"] == pytest.approx(200 * 2**0.5) and r["value"] == pytest.approx(2**0.5)
    assert r["extrapolated"] is False
    # below the lowest: last segment, slope -0.3 per ln 2; 0.3 more loss -> one more doubling: 800
    r = data_equivalent_speedup(B, L, arm_budget=400, arm_loss=2.9)
    assert r == pytest.approx({"value": 2.0, "ref_budget": 800.0, "extrapolated": True})
    # above the highest: first segment, slope -0.5 per ln 2; 0.5 less -> one halving: 50
    r = data_equivalent_speedup(B, L, arm_budget=100, arm_loss=4.5)
    assert r == pytest.approx({"value": 0.5, "ref_budget": 50.0, "extrapolated": True})
    assert data_equivalent_speedup(B, L, 100, 4.0) == {
        "value": 1.0, "ref_budget": 100.0, "extrapolated": False}
    # flat last segment cannot be extrapolated
    assert data_equivalent_speedup(B, [4.0, 3.5, 3.5], 100, 3.0) == {
        "value": None, "ref_budget": None, "extrapolated": True}
    # non-monotone: first crossing from the smallest budget, 3.4 is 3/4 of the way 4.0 -> 3.2: 100 * 2**0.75
    r = data_equivalent_speedup([100, 200, 400, 800], [4.0, 3.2, 3.6, 3.0], arm_budget=100, arm_loss=3.4)
    assert r["ref_budget"] == pytest.approx(100 * 2**0.75) and r["extrapolated"] is False
    assert data_equivalent_speedup(B, L, 100, None)["value"] is None


def test_exchange_rate():
    assert exchange_rate(B, L, 3.35) == pytest.approx(0.3 / 200)  # segment 200..400
    assert exchange_rate(B, L, 3.8) == pytest.approx(0.5 / 100)  # segment 100..200
    assert exchange_rate(B, L, 5.0) == pytest.approx(0.5 / 100)  # above: first segment
    assert exchange_rate(B, L, 3.0) == pytest.approx(0.3 / 200)  # below: last segment
    assert exchange_rate(B, [4.0, None, None], 3.5) is None


# ---- track3_pairwise ---------------------------------------------------------------------------------------

def test_track3_readme_examples():
    assert TRACK3_RATE == pytest.approx(4.5e-5) and TRACK3_SIGMA == 0.0013
    # README: #12 (3.2790, n=20, 3325 steps) vs #6 (3.2788, n=20, 3375):
    # LHS = (-0.0002 + 0.00225) / 0.1**0.5 = 0.00648
    r = track3_pairwise([3.2790] * 20, [3.2788] * 20, 3325, 3375, TRACK3_RATE, TRACK3_SIGMA)
    assert r["adjusted_diff"] == pytest.approx(0.0002 - 0.00225, abs=1e-12)
    assert -r["adjusted_diff"] / math.sqrt(0.1) == pytest.approx(0.00648, abs=5e-6)  # >= 0.004: statsig
    z = -0.00205 / (0.0013 * math.sqrt(0.1))
    assert r["z"] == pytest.approx(z, rel=1e-6) and r["p"] == pytest.approx(stats.norm.cdf(z), rel=1e-5)
    assert r["sigma"] == 0.0013 and "track_3_optimization" in r["source"]
    # README: #13 (n=10, 3210) vs #11 (n=16, 3225), same loss 3.2785: 0.000675 / (1/10 + 1/16)**0.5 = 0.00167
    r = track3_pairwise([3.2785] * 10, [3.2785] * 16, 3210, 3225, TRACK3_RATE, TRACK3_SIGMA)
    assert -r["adjusted_diff"] / math.sqrt(1 / 10 + 1 / 16) == pytest.approx(0.00167, abs=5e-6)  # not statsig


def test_track3_pooled_sigma():
    # pooled: ss = 2 + 8 = 10 over 3 df; adjusted = (2 - 4) + 0.01 (100 - 200) = -3
    # z = -3 / (sqrt(10/3) sqrt(1/2 + 1/3)) = -3 / (5/3) = -1.8
    r = track3_pairwise([1.0, 3.0, None], [2.0, 4.0, 6.0], 100, 200, rate=0.01)
    assert r["sigma"] == pytest.approx(math.sqrt(10 / 3)) and r["adjusted_diff"] == pytest.approx(-3.0)
    assert r["z"] == pytest.approx(-1.8) and r["p"] == pytest.approx(0.0359303, abs=1e-7)
    r = track3_pairwise([1.0], [2.0], 100, 100, rate=0.01)  # no sd to pool
    assert r["adjusted_diff"] == pytest.approx(-1.0) and r["z"] is None and r["p"] is None
