"""The committed benchmark reports against their own runs: every paired comparison a report prints is recomputed
here from the report's runs.csv with scipy alone (no code from bench/), so a report built by stale code, edited by
hand or cut from another run's records fails.

For each committed directory with a report.md and a runs.csv (results/bench_*/ and a ladder's rungs): the seed
runs at the full budget, paired by seed, pairs with a non-finite loss dropped (the protocol's rule); then per row
of the report's "Paired comparisons" table the number of pairs, the mean difference, its Student-t 95% interval
(printed below 8 pairs), the one-sided p of scipy.stats.ttest_rel (arm lower), and Holm's (1979) step-down
adjustment over every row of that table, each equal to the printed figure within its rounding; and summary.json's
vs_reference entries equal the same numbers.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\S+) vs (\S+) \| (\d+) \| ([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\] \| (\S+) / (\S+) \|",
                 re.MULTILINE)


def report_dirs() -> list[Path]:
    found = [*REPO.glob("results/bench_*"), *REPO.glob("results/ladder_*/*")]
    return sorted(d for d in found if (d / "report.md").is_file() and (d / "runs.csv").is_file())


def full_budget_losses(d: Path) -> dict[str, dict[int, float]]:
    """{arm: {seed: final validation loss}} of the fresh-seed runs at the largest budget."""
    rows = [r for r in csv.DictReader((d / "runs.csv").open()) if r["phase"] == "seed"]
    full = max(int(r["budget"]) for r in rows)
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if int(r["budget"]) == full:
            v = r["final_val_loss"]
            out.setdefault(r["arm"], {})[int(r["seed"])] = float(v) if v not in ("", "None") else math.nan
    return out


def holm(p: list[float]) -> list[float]:
    """Holm (1979): with p sorted ascending, adjusted_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))."""
    m, out, running = len(p), [0.0] * len(p), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: p[k])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def recompute(losses: dict[str, dict[int, float]], arm: str, ref: str) -> dict[str, float]:
    seeds = sorted(s for s in losses[arm].keys() & losses[ref].keys()
                   if math.isfinite(losses[arm][s]) and math.isfinite(losses[ref][s]))
    x = np.array([losses[arm][s] for s in seeds])
    y = np.array([losses[ref][s] for s in seeds])
    d = x - y
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"n": len(d), "mean": float(d.mean()), "lo": float(d.mean() - half), "hi": float(d.mean() + half),
            "p": float(stats.ttest_rel(x, y, alternative="less").pvalue)}


def fixed(value: float, printed: str) -> bool:
    """``value`` rounds to ``printed`` (fixed point, e.g. %+.4f): within half a unit of its last decimal."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return abs(value - float(printed)) <= 0.5 * 10 ** -decimals * (1 + 1e-9)


def sig3(value: float, printed: str) -> bool:
    """``value`` rounds to ``printed`` at 3 significant digits (%.3g): within half a unit of the third."""
    shown = float(printed)
    if shown == 0:
        return abs(value) < 5e-13
    return abs(value - shown) <= 0.5 * 10 ** (math.floor(math.log10(abs(shown))) - 2) * (1 + 1e-9)


@pytest.mark.parametrize("d", report_dirs(), ids=lambda d: str(d.relative_to(REPO)))
def test_report_comparisons_recompute_from_runs_csv(d: Path):
    losses = full_budget_losses(d)
    rows = ROW.findall((d / "report.md").read_text())
    assert len(rows) >= 2, f"{d}: no paired-comparisons table found"
    got = [recompute(losses, arm, ref) for arm, ref, *_ in rows]
    adjusted = holm([g["p"] for g in got])
    for (arm, ref, n, mean, lo, hi, p, p_holm), g, h in zip(rows, got, adjusted):
        where = f"{d.name}: {arm} vs {ref}"
        assert g["n"] == int(n), where
        assert fixed(g["mean"], mean), (where, g["mean"], mean)
        if g["n"] < 8:  # from 8 pairs the report prints a BCa bootstrap interval, not recomputed here
            assert fixed(g["lo"], lo) and fixed(g["hi"], hi), (where, g, lo, hi)
        assert sig3(g["p"], p), (where, g["p"], p)
        assert sig3(h, p_holm), (where, h, p_holm)


@pytest.mark.parametrize("d", report_dirs(), ids=lambda d: str(d.relative_to(REPO)))
def test_summary_vs_reference_recomputes_from_runs_csv(d: Path):
    summary = json.loads((d / "summary.json").read_text())
    losses = full_budget_losses(d)
    rows = ROW.findall((d / "report.md").read_text())
    family = holm([recompute(losses, arm, ref)["p"] for arm, ref, *_ in rows])
    adjusted = {(arm, ref): h for (arm, ref, *_), h in zip(rows, family)}
    checked = 0
    for arm, a in summary["arms"].items():
        v = a.get("vs_reference")
        if not v or v.get("p") is None:
            continue
        g = recompute(losses, arm, v["against"])
        assert v["n"] == g["n"], arm
        assert v["mean_diff"] == pytest.approx(g["mean"], abs=1e-12), arm
        assert v["p"] == pytest.approx(g["p"], rel=1e-9, abs=1e-15), arm
        assert v["p_holm"] == pytest.approx(adjusted[(arm, v["against"])], rel=1e-9, abs=1e-15), arm
        if g["n"] < 8:
            assert v["ci"] == pytest.approx([g["lo"], g["hi"]], abs=1e-12), arm
        checked += 1
    assert checked >= 2, f"{d}: summary.json has fewer than two arms with a vs_reference test"


def test_holm_against_a_worked_example():
    # Holm's step-down by hand: p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005 0.01 0.03 0.04
    # -> 4*0.005 = 0.02, 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
