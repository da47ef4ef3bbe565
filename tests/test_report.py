"""Benchmark statistics and report (scripts/bench_stats.py, scripts/report.py) on synthetic benchmark
directories with known curves: every number asserted is computed by hand here (protocol.md definitions).

    .venv/bin/python -m pytest tests/test_report.py -q
"""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from scipy import stats

from scripts.bench_records import RecordError, RunRecord, load_runs, read_bench
from scripts.bench_stats import analyze, caveats, certificate
from scripts.report import build_report, main

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
WORKLOAD = "w" * 64
TOKENS_PER_STEP = 1000
STEPS = list(range(10, 101, 10))
ADAMW_LR, MUON_LR = [0.0015, 0.003, 0.006], [0.01, 0.02, 0.04]
NORMUON_GRID = {"optimizer.lr": MUON_LR, "optimizer.weight_decay": [0.0, 0.1, 0.2]}
REPORT_OUTPUTS = shutil.ignore_patterns("plots", "report.*", "*.csv")


def linear(start, per_step, floor, steps):
    """Loss start - step * per_step, floored; per_step chosen so the values are exact in binary."""
    return [max(start - s * per_step, floor) for s in steps]


def ramp(final, steps):
    """From 5.0 down to `final` at step 100, linearly."""
    return [5 - (5 - final) * s / 100 for s in steps]


def write_run(root, phase, arm, trial, seed, setting, steps, losses, *, opt_time=0.2, state_bytes=None,
              flops_per_step=None, workload=WORKLOAD, diverged=False):
    """A run directory as train.py writes it: config.yaml, env.json, metrics.jsonl (train steps and
    evaluations), summary.json. Evaluation i is at steps[i] with tokens = step x 1000 and training time =
    step x 0.01 s; opt_time is the share of the training time spent in optimizer.step()."""
    d = root / "runs" / phase / arm / trial
    d.mkdir(parents=True)
    cfg = {"seed": seed, "data": {"seed": seed}, "bench": {"arm": arm, "phase": phase, "trial": trial},
           "optimizer": {"name": arm}}
    for key, value in setting.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "env.json").write_text(json.dumps({
        "code": {"commit": "0123456789abcdef", "dirty": False}, "gpu": None,
        "cpu": {"model": "Synthetic CPU", "logical_cores": 2}, "started_at": "2026-11-24T09:00:00+0000"}))
    lines = []
    for s, loss in zip(steps, losses):
        lines.append({"step": s, "train_loss": loss + 0.1, "lr": 1e-3, "grad_norm": 1.0,
                      "tokens": s * TOKENS_PER_STEP, "train_time_s": s * 0.01})
        lines.append({"step": s, "val_loss": loss, "tokens": s * TOKENS_PER_STEP, "train_time_s": s * 0.01})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    finite = [x for x in losses if math.isfinite(x)]
    summary = {"final_val_loss": losses[-1] if math.isfinite(losses[-1]) else None,
               "min_val_loss": min(finite) if finite else None, "steps": steps[-1],
               "tokens": steps[-1] * TOKENS_PER_STEP, "train_time_s": steps[-1] * 0.01,
               "optimizer_step_time_s": opt_time * steps[-1] * 0.01, "tokens_per_s": 1e5,
               "diverged": diverged, "diverged_at_step": 50 if diverged else None, "workload_hash": workload,
               "optimizer": arm, "seed": seed, "data_seed": seed, "n_params": 1000, "flops_per_token": 6000.0}
    if state_bytes is not None:
        summary["optimizer_state_bytes"] = state_bytes
    if flops_per_step is not None:
        summary["flops_per_step"] = flops_per_step
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def write_bench(root, arms, target, chosen, reference="adamw"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "bench.json").write_text(json.dumps({
        "name": root.name, "description": "synthetic benchmark", "experiment": "bench_tiny", "overrides": [],
        "target_loss": target, "reference": reference, "muon_reference": "muon", "muon_variants": ["normuon"],
        "trials": 3, "tuning_seed": 0, "seeds": [1, 2], "chosen": chosen, "created": "2026-11-24T08:00:00",
        "command": "python scripts/bench.py synthetic",
        "arms": {a: {"optimizer": a, "set": {}, "grid": g, "description": f"{a} (synthetic)",
                     "default": {k: v[len(v) // 2] for k, v in g.items()}} for a, g in arms.items()}}))


def normuon_loss(lr, wd):
    return 2.5 + 10 * abs(lr - 0.02) + abs(wd - 0.1)


def make_main_bench(root):
    """Declared target 3.1. Seed runs: adamw reaches it at steps [80, 100] (interpolated [76, 95]), muon at
    [40, 50], normuon at [40, 40]. muon's chosen lr 0.04 is the top of its grid; adamw's lr 0.006 trial
    diverges; normuon has a 3x3 grid whose optimum lr 0.02, wd 0.1 is interior."""
    chosen = {"adamw": {"trial": "t1", "setting": {"optimizer.lr": 0.003}},
              "muon": {"trial": "t2", "setting": {"optimizer.lr": 0.04}},
              "normuon": {"trial": "t4", "setting": {"optimizer.lr": 0.02, "optimizer.weight_decay": 0.1}}}
    write_bench(root, {"adamw": {"optimizer.lr": ADAMW_LR}, "muon": {"optimizer.lr": MUON_LR},
                       "normuon": NORMUON_GRID}, 3.1, chosen)
    for i, (lr, final) in enumerate(zip(ADAMW_LR, [3.4, 3.0, math.nan])):
        losses = ramp(final, STEPS) if i < 2 else [5.0] * 4 + [math.nan] * 6
        write_run(root, "tune", "adamw", f"t{i}", 0, {"optimizer.lr": lr}, STEPS, losses, diverged=i == 2)
    for i, (lr, final) in enumerate(zip(MUON_LR, [2.8, 2.6, 2.4])):
        write_run(root, "tune", "muon", f"t{i}", 0, {"optimizer.lr": lr}, STEPS, ramp(final, STEPS))
    for i, (lr, wd) in enumerate((lr, wd) for lr in MUON_LR for wd in NORMUON_GRID["optimizer.weight_decay"]):
        write_run(root, "tune", "normuon", f"t{i}", 0, {"optimizer.lr": lr, "optimizer.weight_decay": wd},
                  STEPS, ramp(normuon_loss(lr, wd), STEPS))
    seed_curves = {"adamw": (linear(5, 1 / 40, 2.5, STEPS), linear(5, 1 / 50, 2.5, STEPS)),
                   "muon": (linear(5, 1 / 20, 2.0, STEPS), linear(5, 1 / 25, 2.1, STEPS)),
                   "normuon": (linear(5, 1 / 20, 1.9, STEPS), linear(5, 1 / 20, 1.95, STEPS))}
    extra = {"adamw": {"opt_time": 0.2, "state_bytes": 800, "flops_per_step": 7e6},
             "muon": {"opt_time": 0.1, "state_bytes": 400, "flops_per_step": 8e6},
             "normuon": {"opt_time": 0.1}}  # an older record: no state bytes, no flops_per_step
    for arm, curves in seed_curves.items():
        for seed, losses in zip((1, 2), curves):
            write_run(root, "seed", arm, f"s{seed}", seed, chosen[arm]["setting"], STEPS, losses,
                      **extra[arm])
    return root


@pytest.fixture(scope="module")
def main_bench(tmp_path_factory):
    return make_main_bench(tmp_path_factory.mktemp("bench") / "main")


@pytest.fixture(scope="module")
def main_analysis(main_bench):
    return analyze(read_bench(main_bench), load_runs(main_bench))


@pytest.fixture(scope="module")
def built(main_bench):
    """build_report on the main bench, with a snapshot of every other file's bytes before and after."""
    before = {p: p.read_bytes() for p in main_bench.rglob("*") if p.is_file()}
    out = build_report(main_bench)
    return out, before, {p: p.read_bytes() for p in before}


def test_steps_tokens_flops_time_to_target(main_analysis):
    a = main_analysis["arms"]["adamw"]
    assert main_analysis["target"] == {"loss": 3.1, "rule": "declared", "detail": "bench.json target_loss"}
    assert [s["steps"] for s in a["per_seed"]] == [80, 100]
    # first evaluation <= 3.1 is step 80 (3.0); interpolated from step 70 (3.25): 70 + 10 * 0.15 / 0.25
    assert [s["steps_interp"] for s in a["per_seed"]] == pytest.approx([76, 95])
    assert [s["tokens"] for s in a["per_seed"]] == [80_000, 100_000]
    assert [s["flops"] for s in a["per_seed"]] == pytest.approx([80 * 7e6, 100 * 7e6])
    assert [s["time_s"] for s in a["per_seed"]] == pytest.approx([0.8, 1.0])
    assert a["steps"]["median"] == 90 and a["steps"]["ci"] == pytest.approx((80, 100))
    assert a["final"]["median"] == pytest.approx(2.75)
    # normuon's records have no flops_per_step: model FLOPs only (1000 tokens/step x 6000 FLOPs/token)
    assert main_analysis["arms"]["normuon"]["per_seed"][0]["flops"] == pytest.approx(40 * 6e6)
    assert not main_analysis["arms"]["normuon"]["flops_charge_optimizer"]


def test_speedup_and_bootstrap_ci(main_analysis):
    """adamw [80, 100] vs muon [40, 50]: ratio of means 90/45 = 2; the bootstrap ratios range over
    {80, 90, 100} / {40, 45, 50} and the extremes 80/50 and 100/40 each have probability 1/16 > 2.5%."""
    sp = main_analysis["arms"]["muon"]["speedup"]
    assert sp["point"] == pytest.approx(2.0) and sp["ci"] == pytest.approx((1.6, 2.5))
    sp = main_analysis["arms"]["normuon"]["speedup"]  # [80, 100] vs a constant [40, 40]
    assert sp["point"] == pytest.approx(2.25) and sp["ci"] == pytest.approx((2.0, 2.5))


def test_overhead_state_diverged(main_analysis):
    arms = main_analysis["arms"]
    assert arms["adamw"]["overhead"] == pytest.approx(0.2 / 0.8)
    assert arms["muon"]["overhead"] == pytest.approx(0.1 / 0.9)
    assert arms["muon"]["state_ratio"] == pytest.approx(0.5) and arms["adamw"]["state_ratio"] == 1.0
    assert arms["normuon"]["state_ratio"] is None
    assert arms["adamw"]["diverged"] == {"tune": 1, "seed": 0}
    assert arms["muon"]["diverged"] == {"tune": 0, "seed": 0}


def welch(x, y):
    return stats.ttest_ind(x, y, equal_var=False, alternative="less").pvalue


def test_welch_p_values_match_scipy(main_analysis):
    arms = main_analysis["arms"]
    t = {x["vs"]: x for x in arms["muon"]["tests"]}["adamw"]
    assert t["p_final"] == pytest.approx(welch([2.0, 2.1], [2.5, 3.0]), rel=1e-12)
    assert t["p_steps"] == pytest.approx(welch([40, 50], [80, 100]), rel=1e-12)
    vs_muon = {x["vs"]: x for x in arms["normuon"]["tests"]}["muon"]  # a Muon variant is also tested vs Muon
    assert vs_muon["p_final"] == pytest.approx(welch([1.9, 1.95], [2.0, 2.1]), rel=1e-12)
    assert [x["vs"] for x in arms["muon"]["tests"]] == ["adamw"]


def test_certificate_neighbours_and_edge(main_bench, main_analysis):
    muon = main_analysis["arms"]["muon"]["certificate"]
    assert len(muon) == 1 and muon[0]["edge"] and muon[0]["upper"] is None
    assert muon[0]["lower"] == 0.02 and muon[0]["lower_loss"] == pytest.approx(2.6)
    assert muon[0]["local_optimum"] is True
    cert = {c["axis"]: c for c in main_analysis["arms"]["normuon"]["certificate"]}
    lr, wd = cert["optimizer.lr"], cert["optimizer.weight_decay"]
    assert not lr["edge"] and not wd["edge"]
    assert (lr["lower"], lr["upper"]) == (0.01, 0.04)
    assert lr["lower_loss"] == pytest.approx(normuon_loss(0.01, 0.1))
    assert lr["upper_loss"] == pytest.approx(normuon_loss(0.04, 0.1))
    assert wd["lower_loss"] == pytest.approx(normuon_loss(0.02, 0.0))
    assert wd["upper_loss"] == pytest.approx(normuon_loss(0.02, 0.2))
    assert [v for v, _, _ in lr["line"]] == MUON_LR  # the line through the chosen wd only
    text = " ".join(caveats(read_bench(main_bench), main_analysis))
    assert "the chosen optimizer.lr of 0.04 is at the upper edge of its grid [0.01, 0.02, 0.04]" in text
    # adamw's seed curves are straight lines: the power-law fit runs into its bound a = 0 and says so
    assert main_analysis["ref_fit"].at_bound and "ended on a bound of its parameters" in text
    assert main_analysis["warnings"] == []


def test_certificate_categorical_axis():
    """A string axis has no order: no edge, every other value is a neighbour."""
    def run(method, lr, loss):
        return RunRecord(dir=Path("."), arm="x", phase="tune", trial=f"{method}{lr}", seed=0, data_seed=0,
                         setting={"optimizer.method": method, "optimizer.lr": lr},
                         summary={"final_val_loss": loss, "diverged": False}, evals=[])

    runs = [run("ns", 0.01, 3.0), run("polar", 0.01, 2.9), run("qdwh", 0.01, 3.1), run("polar", 0.02, 2.95)]
    cert = certificate({"optimizer.method": ["qdwh", "ns", "polar"], "optimizer.lr": [0.01, 0.02]}, runs,
                       {"optimizer.method": "polar", "optimizer.lr": 0.01})
    method, lr = cert
    assert method["grid"] == ["ns", "polar", "qdwh"] and not method["edge"] and method["local_optimum"]
    assert [(v, loss) for v, loss, _ in method["line"]] == [("ns", 3.0), ("polar", 2.9), ("qdwh", 3.1)]
    assert lr["edge"] and lr["upper_loss"] == 2.95 and lr["lower"] is None


def test_chosen_disagreement_is_loud(main_bench, tmp_path):
    root = shutil.copytree(main_bench, tmp_path / "b", ignore=REPORT_OUTPUTS)
    bench = json.loads((root / "bench.json").read_text())
    bench["chosen"]["adamw"] = {"trial": "t0", "setting": {"optimizer.lr": 0.0015}}
    (root / "bench.json").write_text(json.dumps(bench))
    warn = analyze(read_bench(root), load_runs(root))["warnings"]
    assert any("adamw: bench.json chose trial t0" in w and "rank best t1" in w for w in warn)
    assert any("seed run s1" in w for w in warn)  # its seed runs use lr 0.003, not the declared choice


def test_reference_median_target(tmp_path):
    """target_loss null: the target is the median of adamw's seed finals 3.0 and 3.2 = 3.1, so (by
    construction) only the seed ending at 3.0 reaches it."""
    root = tmp_path / "median"
    write_bench(root, {"adamw": {"optimizer.lr": ADAMW_LR}}, None, {})
    write_run(root, "seed", "adamw", "s1", 1, {"optimizer.lr": 0.003}, STEPS, linear(5, 1 / 50, 0, STEPS))
    write_run(root, "seed", "adamw", "s2", 2, {"optimizer.lr": 0.003}, STEPS, linear(5, 1 / 50, 3.2, STEPS))
    analysis = analyze(read_bench(root), load_runs(root))
    assert analysis["target"]["rule"] == "reference median"
    assert analysis["target"]["loss"] == pytest.approx(3.1)
    steps = analysis["arms"]["adamw"]["steps"]
    assert steps["reached"] == 1 and steps["median"] == math.inf and steps["ci"] is None
    assert any("by construction of the reference-median" in c for c in caveats(read_bench(root), analysis))


def test_data_equivalent_speedup_recovers_power_law(tmp_path):
    """adamw follows L = 2 + 3 (tokens / 1e5)^-0.5 exactly (budget 1e5 tokens, final 5.0). An arm ending at
    4.7 needs 1e5 * (2.7 / 3)^-2 = 123,457 adamw tokens: speedup 1.2346, extrapolated; one ending at 5.5
    needs 1e5 * (3.5 / 3)^-2 = 73,469 (within the budget); one at 1.9 is below the asymptote: unreachable."""
    root, steps = tmp_path / "pl", list(range(5, 101, 5))
    finals = {"muon": 4.7, "slow": 5.5, "magic": 1.9}
    write_bench(root, {a: {"optimizer.lr": [0.01]} for a in ["adamw", *finals]}, 1.0, {})
    for seed in (1, 2):
        write_run(root, "seed", "adamw", f"s{seed}", seed, {"optimizer.lr": 0.01}, steps,
                  [2 + 3 * (s * TOKENS_PER_STEP / 1e5) ** -0.5 for s in steps])
        for arm, final in finals.items():
            write_run(root, "seed", arm, f"s{seed}", seed, {"optimizer.lr": 0.01}, steps,
                      [final + 0.01 * (100 - s) for s in steps])
    analysis = analyze(read_bench(root), load_runs(root))
    fit = analysis["ref_fit"]
    assert (fit.a, fit.b, fit.c, fit.budget) == pytest.approx((2.0, 3.0, 0.5, 1e5), rel=1e-4)
    assert not fit.at_bound
    arms = analysis["arms"]
    assert arms["muon"]["speedup"] is None  # nobody reaches the declared target 1.0
    de = arms["muon"]["data_eq"]
    assert de["speedup"] == pytest.approx(1 / 0.81, rel=1e-3) and de["extrapolated"]
    assert de["status"] == "extrapolated"
    de = arms["slow"]["data_eq"]
    assert de["speedup"] == pytest.approx((3.5 / 3) ** -2, rel=1e-3) and not de["extrapolated"]
    assert arms["magic"]["data_eq"]["status"] == "unreachable"
    text = " ".join(caveats(read_bench(root), analysis))
    assert "muon's data-equivalent speedup extrapolates adamw's power-law fit to 1.23x" in text
    assert "magic's median final loss 1.9000 is at or below the asymptote" in text


def test_outputs_and_nothing_else_written(main_bench, built):
    out, before, after = built
    assert before == after  # the records are untouched
    assert {"md", "html", "csv"} <= set(out)
    pngs = [p for k, p in out.items() if k.startswith("plot_")]
    assert len(pngs) == 5
    for png in pngs:
        assert png.parent == main_bench / "plots" and png.stat().st_size > 15_000
        image = mpimg.imread(png)
        assert image.shape[:2] == (550, 880)  # 8 x 5 inches at 110 dpi
        assert image[..., :3].std() > 0.05  # not a blank canvas
    written = {p for p in main_bench.rglob("*") if p.is_file()} - set(before)
    assert written == set(out.values())


def test_report_markdown_numbers(built):
    md = built[0]["md"].read_text()
    assert "Target loss: **3.1000** (rule: declared" in md
    assert f"`{WORKLOAD}`" in md and "CPU Synthetic CPU (2 logical cores)" in md
    lines = md.splitlines()
    assert ("| muon (n=2) | lr=0.04 | 2.0500 [2.0000, 2.1000] | 2.0500 | 45 [40, 50] | 42.8 [38.0, 47.5] | "
            "45k [40k, 50k] | 360M [320M, 400M] | 0.45 [0.4, 0.5] | 2.00 [1.60, 2.50] |") in lines
    assert ("| adamw (n=2) | lr=0.003 | 2.7500 [2.5000, 3.0000] | 2.7500 | 90 [80, 100] | "
            "85.5 [76.0, 95.0] | 90k [80k, 100k] | 630M [560M, 700M] | 0.9 [0.8, 1] | "
            "1 (reference) |") in lines
    p = welch([2.0, 2.1], [2.5, 3.0])
    assert f"| muon | {p:.3g} | 0.0459 * | - | - | 0 / 3 + 0 / 2 | 11.1% | 0.50 |" in lines
    assert "| adamw | - | - | - | - | 1 / 3 + 0 / 2 | 25.0% | 1.00 |" in lines
    assert ("| adamw | optimizer.lr | 0.0015, 0.003, 0.006 | 0.003 (3.0000) | 0.0015 (3.4000) | "
            "0.006 (diverged) | yes | no |") in lines
    assert "**EDGE**" in md and "little power" in md
    assert md.count("| adamw | t") == 3 and md.count("| normuon | t") == 9  # every tune trial


def test_runs_csv(built):
    rows = list(csv.DictReader(built[0]["csv"].open()))
    assert len(rows) == 3 + 3 + 9 + 2 * 3
    assert {"phase", "arm", "trial", "optimizer.lr", "optimizer.weight_decay", "seed", "data_seed",
            "final_val_loss", "min_val_loss", "steps_to_target", "steps_to_target_interp", "tokens_to_target",
            "flops_to_target", "train_time_to_target_s", "diverged", "optimizer_step_time_s",
            "optimizer_state_bytes", "tokens_per_s", "run_dir"} <= set(rows[0])
    seed1 = next(r for r in rows if r["phase"] == "seed" and r["arm"] == "adamw" and r["seed"] == "1")
    assert float(seed1["steps_to_target"]) == 80
    assert float(seed1["steps_to_target_interp"]) == pytest.approx(76)
    bad = next(r for r in rows if r["arm"] == "adamw" and r["trial"] == "t2")
    assert bad["diverged"] == "True" and bad["final_val_loss"] == "" and bad["steps_to_target"] == ""
    assert next(r for r in rows if r["arm"] == "muon")["optimizer.weight_decay"] == ""


def test_html_self_contained(built):
    page = built[0]["html"].read_text()
    assert page.count('<img src="data:image/png;base64,') == 5
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert "2.00 [1.60, 2.50]" in page  # the same content as report.md


def test_partial_benchmark_reports(tmp_path):
    """Tuning done for two arms, seed runs for one, one of which diverged: the report still builds and says
    so (no CI, no speedup)."""
    root = tmp_path / "partial"
    write_bench(root, {"adamw": {"optimizer.lr": ADAMW_LR}, "muon": {"optimizer.lr": MUON_LR}}, 3.1,
                {"adamw": {"trial": "t1", "setting": {"optimizer.lr": 0.003}}})
    for i, lr in enumerate(ADAMW_LR):
        final = 3.0 + abs(i - 1) / 8  # the middle lr is best
        write_run(root, "tune", "adamw", f"t{i}", 0, {"optimizer.lr": lr}, STEPS, ramp(final, STEPS))
    write_run(root, "tune", "muon", "t0", 0, {"optimizer.lr": 0.01}, STEPS, ramp(2.9, STEPS))
    write_run(root, "seed", "adamw", "s1", 1, {"optimizer.lr": 0.003}, STEPS, ramp(3.0, STEPS))
    write_run(root, "seed", "adamw", "s2", 2, {"optimizer.lr": 0.003}, STEPS, [4.0] * 5 + [math.nan] * 5,
              diverged=True)
    md = build_report(root)["md"].read_text()
    # seed 2 diverged: final median of [3.0, inf] is inf; min losses 3.0 and 4.0; steps median of [100, inf]
    assert "| adamw (n=2) | lr=0.003 | diverged | 3.5000 | not reached | not reached |" in md
    assert "| muon | - | - | - | - | 0 / 1 + 0 / 0 | - | - |" in md
    assert "muon has no complete seed runs yet" in md
    assert "muon has 1 complete tuning trials of the 3 declared" in md
    assert "muon: bench.json has no chosen setting; using choose_best's trial t0" in md


def test_refuses_mixed_workloads_and_empty(main_bench, tmp_path, capsys):
    root = shutil.copytree(main_bench, tmp_path / "mixed", ignore=REPORT_OUTPUTS)
    summary = root / "runs" / "seed" / "muon" / "s1" / "summary.json"
    summary.write_text(summary.read_text().replace(WORKLOAD, "v" * 64))
    with pytest.raises(RecordError, match="runs of 2 workloads"):
        build_report(root)
    assert main([str(root)]) == 2 and "never compared" in capsys.readouterr().err
    assert not (root / "report.md").exists() and not (root / "plots").exists()
    empty = tmp_path / "empty"
    write_bench(empty, {"adamw": {"optimizer.lr": ADAMW_LR}}, None, {})
    with pytest.raises(RecordError, match="no complete runs"):
        build_report(empty)
    proc = subprocess.run([sys.executable, "scripts/report.py", str(empty)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no complete runs" in proc.stderr
    assert main([str(tmp_path / "nothing")]) == 2 and "no bench.json" in capsys.readouterr().err


def chromium(*args, profile, timeout=90):
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed (apt-get install chromium)")
def test_html_renders_in_headless_chromium(built, tmp_path):
    """The page loads without console errors, every embedded PNG decodes (the page's own script writes
    data-images-ok="N/N" on <body>), and a screenshot of it is not blank."""
    url = built[0]["html"].as_uri()
    dom = chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url,
                   profile=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="5/5"' in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [], console
    shot = tmp_path / "shot.png"
    proc = chromium("--window-size=1280,2400", f"--screenshot={shot}", url, profile=tmp_path / "profile2")
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1280) and float(np.var(pixels)) > 0.01


def test_a_diverged_run_is_counted_never_averaged():
    """protocol.md rule 6: a diverged seed run ranks last (its loss is +inf) and turns every mean-based figure
    (bootstrap CI, Welch test, speedup ratio) into 'undefined' instead of averaging a blown-up number in."""
    from scripts.bench_stats import bootstrap_ci, bootstrap_ratio, median, welch_less

    finals = [4.0, math.inf, 4.2]  # seed 1 diverged
    assert median(finals) == 4.2  # rank-based: the diverged run counts as the worst, not as a number
    assert bootstrap_ci(finals) is None
    assert welch_less(finals, [4.5, 4.6, 4.4]) is None and welch_less([4.5, 4.6, 4.4], finals) is None
    assert bootstrap_ratio([100, 100], [50, math.inf]) is None
    assert welch_less([4.0, 4.1, 4.2], [4.5, 4.6, 4.4]) < 0.01  # the same figures without the divergence
    assert bootstrap_ratio([100, 100], [50, 50])["point"] == 2.0
