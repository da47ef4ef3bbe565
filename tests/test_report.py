"""The benchmark report's outputs (bench/report.py, bench/plots.py, scripts/report.py) on the synthetic benchmark of
tests/synthetic_bench.py: what is written, summary.json, the headline-first report, runs.csv, self-contained HTML.

    .venv/bin/pytest -q tests/test_report.py
"""

import csv
import json
import math
import re
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest
from synthetic_bench import (
    BUDGETS,
    CHOSEN,
    CHROMIUM,
    COMMIT,
    CURVE,
    FLOPS,
    HYBRID,
    N_PARAMS,
    NON_EMBEDDING,
    STATE,
    TIMING,
    TOKENS_PER_STEP,
    copy_bench,
    t_interval,
    write_run,
)

from bench.analysis import analyze, summary
from bench.records import load_runs
from bench.report import build_report, headline

# ---------------------------------------------------------------------------------------------- outputs

def test_outputs_and_nothing_else_written(main_bench, built):
    out, before, after = built
    assert before == after  # the records are untouched
    assert set(out) == {"md", "html", "csv", "summary", "plot_loss_vs_budget", "plot_loss_curves",
                        "plot_best_of_k"}
    for key in ("plot_loss_vs_budget", "plot_loss_curves", "plot_best_of_k"):
        png = out[key]
        assert png.parent == main_bench / "plots" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(png)
        assert image.shape[:2] == (550, 880)  # 8 x 5 inches at 110 dpi
        assert image[..., :3].std() > 0.05  # not a blank canvas
    written = {p for p in main_bench.rglob("*") if p.is_file()} - set(before)
    assert written == set(out.values())


def test_summary_json(built, an):
    s = json.loads(built[0]["summary"].read_text())
    assert s["protocol"] == 2 and s["bench"] == "main" and s["reference"] == "adamw"
    assert s["code_versions"] == [COMMIT[:12]]
    w = s["workload"]
    assert {"n_params", "non_embedding_params", "tokens_per_step", "budgets", "epochs"} <= set(w)
    assert (w["n_params"], w["non_embedding_params"], w["tokens_per_step"], w["budgets"]) == \
        (N_PARAMS, NON_EMBEDDING, TOKENS_PER_STEP, BUDGETS)
    assert w["epochs"] == pytest.approx(400 * TOKENS_PER_STEP / an["baselines"]["train_tokens"])
    assert s["baselines"] == {k: an["baselines"][k] for k in ("unigram", "bigram", "trigram")}
    assert s["hybrid"] == HYBRID and s["hybrid_source"] == "test"
    assert s["target"]["loss"] == pytest.approx(3.2)
    assert set(s["arms"]) == {"adamw", "muon", "normuon", "v"}
    for name, a in s["arms"].items():
        assert {"n_seeds", "trials", "tuned_knobs", "end_loss", "vs_reference", "data_equivalent_speedup",
                "step_overhead", "state_ratio"} <= set(a), name
        assert {"median", "ci"} <= set(a["end_loss"]) and len(a["end_loss"]["ci"]) == 2
    arms = s["arms"]
    assert [arms[a]["n_seeds"] for a in ("adamw", "muon", "normuon", "v")] == [4, 3, 4, 4]
    assert [arms[a]["trials"] for a in ("adamw", "muon", "normuon", "v")] == [3, 3, 3, 0]
    assert arms["muon"]["tuned_knobs"] == ["optimizer.lr", "optimizer.weight_decay"]
    assert arms["adamw"]["end_loss"]["median"] == pytest.approx(3.2)
    assert arms["adamw"]["end_loss"]["ci"] == pytest.approx(list(t_interval([3.1, 3.15, 3.25, 3.4])))
    assert arms["adamw"]["vs_reference"] is None
    for name, against in (("muon", "adamw"), ("normuon", "adamw"), ("v", "muon")):
        t, vs = an["tests"][f"{name} vs {against}"], arms[name]["vs_reference"]
        assert {"mean_diff", "ci", "p", "p_holm"} <= set(vs) and vs["against"] == against
        assert vs["mean_diff"] == pytest.approx(t["mean_diff"]) and vs["ci"] == pytest.approx([t["lo"], t["hi"]])
        assert (vs["p"], vs["p_holm"], vs["mdd"]) == pytest.approx((t["p"], t["p_holm"], t["mdd"]))
    assert arms["muon"]["data_equivalent_speedup"] == {"value": pytest.approx(2 ** 0.5), "extrapolated": True}
    assert arms["normuon"]["data_equivalent_speedup"] == {"value": pytest.approx(2 ** -0.5),
                                                          "extrapolated": False}
    assert arms["v"]["data_equivalent_speedup"] is None
    assert arms["muon"]["step_overhead"] == pytest.approx(1.0) and arms["muon"]["state_ratio"] == 0.5
    assert arms["muon"]["curve"] == {str(B): pytest.approx(CURVE["muon"][B]) for B in BUDGETS}
    assert s["flags"] == an["flags"]


def test_cost_to_target(built, an):
    """docs/protocol.md 6.4.1: tokens = steps x tokens per step, FLOPs = steps x FLOPs per step, time = steps x the
    median seconds per step, over the reference's time; nulls, and "not reached", for an arm that does not reach
    the target."""
    s = json.loads(built[0]["summary"].read_text())["arms"]
    steps = {"adamw": 400.0, "muon": 200 * 2 ** 0.5, "v": 400.0}  # v: its one budget is already below 3.2
    per_step = {a: TIMING[a][1] / 400 for a in TIMING}  # every full-budget seed run trains 400 steps
    for arm, n in steps.items():
        a = s[arm]
        assert a["seconds_per_step"] == pytest.approx(per_step[arm]) and a["flops_per_step"] == FLOPS[arm]
        c = a["to_target"]
        assert c["steps"] == pytest.approx(n) == a["steps_to_target"]["value"]
        assert c["tokens"] == pytest.approx(n * TOKENS_PER_STEP)
        assert c["flops"] == pytest.approx(n * FLOPS[arm]) and c["train_time_s"] == pytest.approx(n * per_step[arm])
        assert c["time_vs_reference"] == pytest.approx(c["train_time_s"] / (400 * per_step["adamw"]))
    assert s["adamw"]["to_target"]["time_vs_reference"] == 1.0 and s["adamw"]["to_target"]["where"] == "interpolated"
    assert s["muon"]["to_target"]["time_vs_reference"] == pytest.approx(2 ** -0.5)
    assert s["v"]["to_target"]["where"] == "at_smallest"
    assert s["normuon"]["to_target"] == {"steps": None, "tokens": None, "flops": None, "train_time_s": None,
                                         "time_vs_reference": None, "where": "not_reached"}
    assert s["normuon"]["seconds_per_step"] == pytest.approx(9.0 / 400)
    md = built[0]["md"].read_text()
    head, rows = next(t for t in md_tables(md) if t[0][:2] == ["arm", "steps"])
    assert md.index("## Cost to the target (on the median curve)") < md.index("| arm | steps |")
    assert head == ["arm", "steps", "tokens", "FLOPs", "training time", "time / adamw's"]
    assert rows == [["adamw", "400", "204,800", "1.2e+10", "10.0 s", "1.00"],
                    ["muon", "283", f"{200 * 2 ** 0.5 * TOKENS_PER_STEP:,.0f}", f"{200 * 2 ** 0.5 * 3.3e7:.3g}",
                     f"{200 * 2 ** 0.5 * 0.025:.1f} s", "0.71"],
                    ["normuon", "not reached", "-", "-", "-", "-"],
                    ["v", "400 (at or before)", "204,800", "1.32e+10", "12.0 s", "1.20"]]
    assert "time = steps to target x the median seconds per step" in md and "step overhead" in md


def md_tables(md):
    """Every Markdown table as (header cells, row cells), in order."""
    out, cur = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if cur is None:
                cur = (cells, [])
                out.append(cur)
            elif not set(line) <= set("|-"):
                cur[1].append(cells)
        else:
            cur = None
    return out


def test_report_headline_first(built, an):
    md = built[0]["md"].read_text()
    head, rows = md_tables(md)[0]  # the first table of the report
    assert md.index("| arm |") < md.index("## ")  # before any section
    assert head[0] == "arm" and head[1].startswith("end-of-schedule loss")
    assert [r[0] for r in rows] == ["adamw", "muon", "normuon"]  # the main arms, not the variant
    cells = {r[0]: dict(zip(head, r)) for r in rows}
    lo, hi = t_interval([3.1, 3.15, 3.25, 3.4])
    adamw = cells["adamw"]
    assert list(adamw.values())[1:] == [f"3.200 [{lo:.3f}, {hi:.3f}]", "4", "(reference)", "-", "-",
                                        "1 (reference)", "25.0%", "1.00"]
    t = an["tests"]["muon vs adamw"]
    muon = list(cells["muon"].values())
    assert muon[1:4] == [f"3.000 [{t_interval([2.92, 3.0, 3.03])[0]:.3f}, {t_interval([2.92, 3.0, 3.03])[1]:.3f}]",
                         "3", f"{t['mean_diff']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]"]
    assert muon[4:] == [f"{t['p']:.3g} / {t['p_holm']:.3g}", f"{t['mdd']:.3f}", "1.41 at B=200", "100.0%",
                        "0.50"]
    assert cells["normuon"]["data-equivalent speedup"] == "0.71"
    html = built[0]["html"].read_text()
    first = html[html.index("<table>"):html.index("</table>")]
    assert "end-of-schedule loss" in first and first.count("<tr>") == 1 + 3


def test_report_sections(built, an):
    md = built[0]["md"].read_text()
    assert "> **WARNING**: muon: the chosen optimizer.lr=0.04 is at the edge of its range" in md
    assert "> **WARNING**: adamw: the chosen optimizer.weight_decay=0.1 is beaten by a neighbour" in md
    assert "> **WARNING**: fewer than 5 seeds per arm" in md
    assert "measures n-gram learning" not in md
    assert "Target 3.200: the reference (adamw) median end-of-schedule loss" in md
    assert f"{N_PARAMS:,} parameters ({NON_EMBEDDING:,} non-embedding), 512 tokens/step" in md
    assert "coordinate with 3 trials per arm" in md and f"Code: {COMMIT[:12]}." in md
    _, rows = next(t for t in md_tables(md) if t[0][0] == "comparison")
    assert [r[0] for r in rows] == list(an["tests"])
    budget_rows = next(t for t in md_tables(md) if t[0][1:4] == ["B=100", "B=200", "B=400"])[1]
    assert budget_rows[1][:5] == ["muon", "3.800", "3.400", "3.000", f"{200 * 2 ** 0.5:.0f}"]
    assert budget_rows[2][4] == "not reached" and budget_rows[0][5] == "not reached (2/4 seeds)"
    tuning = next(t for t in md_tables(md) if "tuned knobs" in t[0])
    assert [r[:4] for r in tuning[1]] == [["adamw", "lr, weight_decay", "3", "0"],
                                          ["muon", "lr, weight_decay", "3", "0"],
                                          ["normuon", "lr, weight_decay", "3", "1"]]
    assert tuning[1][0][5] == "3.050"  # the chosen trial's loss on the tuning seed
    cert = next(t for t in md_tables(md) if "step down: loss" in t[0])[1]
    assert ["muon", "lr", "0.04", "0.02: 2.900", "edge", "EDGE"] in cert
    assert ["adamw", "weight_decay", "0.1", "0.05: 3.100", "0.2: 3.000", "BEATEN"] in cert
    assert ["normuon", "weight_decay", "0.1", "0.05: 3.200", "0.2: -", "ok"] in cert
    assert "## Variant arms (reported apart)" in md and "Diagnostics were not recorded" in md


def test_runs_csv(built, runs):
    rows = list(csv.DictReader(built[0]["csv"].open()))
    assert len(rows) == len(runs) == 51  # one row per complete run
    assert {(r["phase"], r["arm"], r["trial"]) for r in rows} == {(r.phase, r.arm, r.trial) for r in runs}
    bad = next(r for r in rows if r["arm"] == "normuon" and r["trial"] == "lr=0.04,weight_decay=0.1")
    assert bad["diverged"] == "True" and bad["final_val_loss"] == ""
    b = next(r for r in rows if r["phase"] == "branch" and r["arm"] == "adamw" and r["trial"] == "s4_b100")
    assert (b["seed"], b["budget"], float(b["final_val_loss"])) == ("4", "100", pytest.approx(4.2))
    assert b["branch_from"].endswith("runs/seed/adamw/s4") and float(b["step_overhead"]) == 0.25


def test_html_self_contained(built):
    page = built[0]["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == page.count("<img") == 3
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # nothing loaded from outside
    assert "default-src 'none'" in page
    assert "1.41 (extrapolated)" in page  # the same content as report.md


def diverge(root, arm, seed, **fields):
    """Mark the fresh-seed run `seed` of `arm` as diverged in its summary.json, as train.py records it."""
    path = root / "runs" / "seed" / arm / f"s{seed}" / "summary.json"
    s = json.loads(path.read_text())
    path.write_text(json.dumps({**s, "diverged": True, "final_val_loss": None, "diverged_at_step": 300, **fields}))


def test_diverged_fresh_seed_is_flagged(main_bench, tmp_path, an, kjv_dir):
    """A fresh seed that diverged is recorded (+inf), left out of the numbers that need finite losses (mean,
    intervals, paired tests), counted as the worst value in the medians, and named in the flags, never dropped
    silently."""
    assert not any("diverged" in f for f in an["flags"])
    root = copy_bench(main_bench, tmp_path / "diverged")
    diverge(root, "normuon", 2)
    an = analyze(root, load_runs(root))
    a = an["arms"]["normuon"]
    assert a["losses"][400][2] == math.inf and a["n_seeds"] == 4
    # 3.38, 3.41, 3.44 and +inf: the median (3.41 + 3.44) / 2, the curve's point; the mean of the finite three
    assert a["end_loss"]["n"] == 3 and a["end_loss"]["n_diverged"] == 1
    assert a["end_loss"]["median"] == pytest.approx(3.425) == a["curve"][-1]
    assert a["end_loss"]["mean"] == pytest.approx((3.38 + 3.41 + 3.44) / 3)
    assert an["tests"]["normuon vs adamw"]["seeds"] == [1, 3, 4]
    assert ("normuon: fresh-seed runs diverged (s2 at 400); left out of its end-loss mean, interval and paired "
            "tests, counted as the worst value in its medians (the end-of-schedule loss, the loss-vs-budget curve, "
            "steps to target, speedups)") in an["flags"]


def test_diverged_seed_in_the_headline_median(main_bench, tmp_path, kjv_dir):
    """docs/protocol.md 5.6: with 5 seeds and 1 diverged the median is the 3rd of the sorted five, +inf last; the
    mean and its t interval are over the 4 finite seeds and say so; when most seeds diverge the median is +inf,
    written null in summary.json (strict JSON), and the report still builds."""
    root = copy_bench(main_bench, tmp_path / "five")
    write_run(root, "seed", "normuon", "s5", seed=5, budget=400, setting=CHOSEN["normuon"], final=3.50,
              evals=[0, 100, 200, 300, 400], timing=(3.0, 10.0), state_bytes=STATE["normuon"],
              flops=FLOPS["normuon"])
    diverge(root, "normuon", 2, steps=200, train_time_s=1.0)  # a diverged run's rate is left out (0.005 s/step)
    for seed, train_s in ((1, 8.0), (3, 9.0), (4, 12.0)):
        path = root / "runs" / "seed" / "normuon" / f"s{seed}" / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "train_time_s": train_s}))
    an = analyze(root, load_runs(root))
    a, finite = an["arms"]["normuon"], [3.38, 3.41, 3.44, 3.50]
    assert sorted(a["losses"][400].values()) == [*map(pytest.approx, finite), math.inf]
    assert a["n_seeds"] == 5 and a["end_loss"]["n"] == 4 and a["end_loss"]["n_diverged"] == 1
    assert a["end_loss"]["median"] == pytest.approx(3.44) == a["curve"][-1]  # 3.38, 3.41, [3.44], 3.50, inf
    assert a["end_loss"]["mean"] == pytest.approx(np.mean(finite)) and a["end_loss"]["method"] == "t"
    assert (a["end_loss"]["lo"], a["end_loss"]["hi"]) == pytest.approx(t_interval(finite))
    assert a["seconds_per_step"] == pytest.approx((9.0 + 10.0) / 2 / 400)  # s1, s3, s4, s5: 8, 9, 12, 10 s
    s = summary(an)["arms"]["normuon"]
    assert s["n_seeds"] == 5 and s["n_seeds_diverged"] == 1
    assert s["end_loss"]["median"] == pytest.approx(3.44) and s["end_loss"]["n_finite"] == 4
    assert s["end_loss"]["ci"] == pytest.approx(list(t_interval(finite)))
    head, rows = headline(an)[0][1:]
    cells = {r[0]: dict(zip(head, r)) for r in rows}
    assert cells["normuon"]["seeds"] == "5 (1 diverged)" and cells["adamw"]["seeds"] == "4"
    assert cells["normuon"][head[1]] == f"3.440 [{t_interval(finite)[0]:.3f}, {t_interval(finite)[1]:.3f}]"
    assert "A diverged seed counts as the worst value in the median" in headline(an)[1][1]

    diverge(root, "normuon", 1)
    diverge(root, "normuon", 3)  # 3 of 5: the median is +inf
    out = build_report(root)
    strict = json.loads(out["summary"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    s = strict["arms"]["normuon"]
    assert s["n_seeds_diverged"] == 3 and s["end_loss"]["median"] is None and s["end_loss"]["n_finite"] == 2
    assert s["end_loss"]["mean"] == pytest.approx(3.47) and s["end_loss"]["ci"] == pytest.approx(
        list(t_interval([3.44, 3.50])))
    assert s["curve"]["400"] is None and s["data_equivalent_speedup"]["value"] is None
    md = out["md"].read_text()
    row = next(r for r in md_tables(md)[0][1] if r[0] == "normuon")
    assert row[1].startswith("diverged [") and row[2] == "5 (3 diverged)"
    assert row[3] == "-"  # seed 4 alone is finite in both normuon and adamw: no paired test (not "(reference)")

    diverge(root, "normuon", 4)  # 4 of 5: no interval either (one finite seed)
    s = summary(analyze(root, load_runs(root)))["arms"]["normuon"]
    assert s["n_seeds_diverged"] == 4 and s["end_loss"]["n_finite"] == 1
    assert (s["end_loss"]["median"], s["end_loss"]["mean"], s["end_loss"]["ci"]) == (None, None, [None, None])


def test_diverged_reference_gives_no_target(main_bench, tmp_path, kjv_dir):
    """Most of the reference's seeds diverged: its median is +inf, so there is no target (not an infinite one that
    every arm 'reaches' at its smallest budget)."""
    root = copy_bench(main_bench, tmp_path / "reference")
    for seed in (1, 2):  # 2 of 4: the median is (x + inf) / 2
        diverge(root, "adamw", seed)
    an = analyze(root, load_runs(root))
    assert an["arms"]["adamw"]["end_loss"]["median"] == math.inf and an["target"]["loss"] is None
    assert all(a["steps_to_target"] is None and a["to_target"] is None for a in an["arms"].values())
    assert an["tests"]["normuon vs adamw"]["exchange_rate"] is None  # seeds 3, 4 paired; no rate at an inf loss


def test_several_code_versions_said(main_bench, tmp_path, kjv_dir):
    root = copy_bench(main_bench, tmp_path / "versions")
    env = root / "runs" / "seed" / "muon" / "s2" / "env.json"
    env.write_text(env.read_text().replace('"dirty": false', '"dirty": true'))
    an = analyze(root, load_runs(root))
    assert an["code_versions"] == [COMMIT[:12], COMMIT[:12] + "-dirty"]


def chromium(*args, profile, timeout=90):
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(built, tmp_path):
    """The page loads without console errors (its CSP blocks nothing it needs), every embedded PNG decodes
    (the page's own script writes data-images-ok="N/N" on <body>), and a screenshot of it is not blank."""
    url = built[0]["html"].as_uri()
    dom = chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url,
                   profile=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="3/3"' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    shot = tmp_path / "shot.png"
    proc = chromium("--window-size=1280,2400", f"--screenshot={shot}", url, profile=tmp_path / "profile2")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1280) and float(np.var(pixels)) > 0.01
