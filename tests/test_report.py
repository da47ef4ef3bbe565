"""The benchmark report (bench/records.py, bench/analysis.py, bench/report.py, bench/plots.py, scripts/report.py)
on synthetic protocol-v2 benchmark directories laid out exactly like scripts/bench.py's (bench.json and
runs/<phase>/<arm>/<trial>/ with config.yaml, env.json, metrics.jsonl, summary.json), with losses chosen here
so that every number asserted is computed by hand in the test (protocol.md v2 definitions).

    .venv/bin/pytest -q tests/test_report.py

The main benchmark: budgets 100, 200, 400 (WSD: seed runs at 400, cooldown branches at 100 and 200), seeds
1-4, coordinate search with 3 trials per arm, the reference adamw, muon (the Muon reference), normuon (a Muon
variant of the main comparison) and v (a variant arm of muon that inherits its setting). End-of-schedule loss
of arm a, seed s, budget B: CURVE[a][B] + OFFSET[a][s]; the offsets' median is 0, so the medians over seeds
are the CURVE values: adamw 4.0, 3.6, 3.2 (the target: its fresh-seed median at 400; its tuning-seed loss is
3.05), muon 3.8, 3.4, 3.0 (seed 4 never finished), normuon 4.2, 3.8, 3.4.
"""

import csv
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import yaml
from scipy import stats as sps

import bench.analysis as analysis_mod
from bench import stats
from bench.analysis import analyze, summary
from bench.baselines import baselines
from bench.declaration import seed_pair
from bench.records import RecordError, load_run, load_runs
from bench.report import build_report
from data.config import DataConfig
from data.loader import TokenData
from scripts.report import main

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
INIT = 8.0  # every run's validation loss at step 0
SEQ_LEN, BATCH = 64, 8
TOKENS_PER_STEP = SEQ_LEN * BATCH
VAL_TOKENS = 4096
# gpt2, 1 layer, d_model 16, 2 heads, vocabulary 4096, block 64 (models/gpt2.py: biases, LayerNorms, tied head):
# wte 4096*16 = 65536, wpe 64*16 = 1024, ln_1 + ln_2 2*32, c_attn 16*48 + 48 = 816, attn c_proj 16*16 + 16 = 272,
# c_fc 16*64 + 64 = 1088, mlp c_proj 64*16 + 16 = 1040, ln_f 32
MODEL = {"family": "gpt2", "n_layer": 1, "n_head": 2, "d_model": 16, "vocab_size": 4096, "block_size": 64}
N_PARAMS = 65536 + 1024 + 64 + 816 + 272 + 1088 + 1040 + 32
NON_EMBEDDING = N_PARAMS - 65536 - 1024  # Kaplan's count: no token or position embedding (a tied head too)
BUDGETS = [100, 200, 400]
SEEDS = [1, 2, 3, 4]
HYBRID = {"lr": 0.003, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01,
          "decay_groups": ["embedding", "head"]}
COMMIT = "0123456789abcdef0123"


def axis(default, low, high, step=2.0):
    return {"default": default, "low": low, "high": high, "scale": "log", "step": step, "source": "test"}


SPACES = {
    "adamw": {"optimizer.lr": axis(0.004, 0.001, 0.016), "optimizer.weight_decay": axis(0.1, 0.01, 1.0)},
    "muon": {"optimizer.lr": axis(0.02, 0.01, 0.04), "optimizer.weight_decay": axis(0.1, 0.01, 1.0)},
    "normuon": {"optimizer.lr": axis(0.02, 0.005, 0.08), "optimizer.weight_decay": axis(0.1, 0.01, 1.0)},
}
CHOSEN = {"adamw": {"optimizer.lr": 0.004, "optimizer.weight_decay": 0.1},
          "muon": {"optimizer.lr": 0.04, "optimizer.weight_decay": 0.1},
          "normuon": {"optimizer.lr": 0.02, "optimizer.weight_decay": 0.1}}
# tuning-seed losses at the full budget: (lr, wd) -> loss (None: diverged). The first three of each arm are
# the coordinate search's 3 trials (the default and its lr neighbours), the rest certificate runs
TUNE = {"adamw": {(0.002, 0.1): 3.3, (0.004, 0.1): 3.05, (0.008, 0.1): 3.2},
        "muon": {(0.01, 0.1): 3.0, (0.02, 0.1): 2.9, (0.04, 0.1): 2.8},
        "normuon": {(0.01, 0.1): 3.3, (0.02, 0.1): 3.1, (0.04, 0.1): None}}
CERT = {"adamw": {(0.004, 0.05): 3.1, (0.004, 0.2): 3.0},  # wd 0.2 beats the chosen 3.05
        "muon": {(0.04, 0.05): 2.85, (0.04, 0.2): 2.9},  # lr 0.04 is the top of its range: edge
        "normuon": {(0.02, 0.05): 3.2}}  # wd 0.2 never ran: an incomplete certificate
CURVE = {"adamw": {100: 4.0, 200: 3.6, 400: 3.2}, "muon": {100: 3.8, 200: 3.4, 400: 3.0},
         "normuon": {100: 4.2, 200: 3.8, 400: 3.4}}
OFFSET = {"adamw": {1: -0.1, 2: -0.05, 3: 0.05, 4: 0.2}, "muon": {1: -0.08, 2: 0.0, 3: 0.03},
          "normuon": {1: -0.02, 2: -0.01, 3: 0.01, 4: 0.04}}
V_LOSS = {1: 2.95, 2: 3.02, 3: 3.0, 4: 3.1}  # the variant v: full budget only
# summary.json timings (optimizer.step() s, training s) and optimizer state bytes per arm
TIMING = {"adamw": (2.0, 10.0), "muon": (5.0, 10.0), "normuon": (3.0, 9.0), "v": (4.0, 12.0)}
STATE = {"adamw": 800, "muon": 400, "normuon": 600, "v": 1000}


def end_loss(arm, seed, budget):
    return CURVE[arm][budget] + OFFSET[arm][seed]


def sid(setting):
    """bench/search.py's setting id: `lr=0.004,weight_decay=0.1`."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v:g}" for k, v in setting.items())


def whash(budget, tag="w"):
    """Every budget has its own workload hash (max_steps is part of the workload), as in a real benchmark."""
    return f"{tag}{budget}".ljust(64, "0")


def write_bench(root, arms, *, chosen, budgets=BUDGETS, seeds=SEEDS, target=None, reference="adamw",
                muon_variants=("normuon",), trials=3, protocol=2, name=None):
    """bench.json as scripts/bench.py writes it (bench/run.py): arms with their spaces, chosen, hybrid_used."""
    root.mkdir(parents=True, exist_ok=True)
    hybrid = {**HYBRID, "from_reference": False, "source": "test"}
    schedule = {"name": "wsd", "warmup_frac": 0.05, "warmup_steps": 1, "decay_frac": 0.25, "min_lr_frac": 0.0}
    search = {"method": "coordinate", "seed": 0, "trials": trials}
    decl = {
        "name": name or root.name, "description": "synthetic benchmark", "experiment": "smoke",
        "overrides": ["schedule=wsd"], "protocol": protocol, "reference": reference, "muon_reference": "muon",
        "muon_variants": list(muon_variants), "budgets": list(budgets), "seeds": list(seeds), "tuning_seed": 0,
        "search": search, "target": {"loss": target, "source": "declared a priori" if target else ""},
        "schedule": schedule, "hybrid": hybrid, "hybrid_used": dict(HYBRID), "tune_hybrid_lr": False,
        "diagnostics": {}, "jobs": 1, "launcher": "basic", "logger": "none", "threads": 1,
        "created": "2026-12-01T12:00:00+0000", "command": "scripts/bench.py synthetic.yaml",
        "arms": {a: {"optimizer": d.get("optimizer", a), "description": "", "set": d.get("set", {}),
                     "space": d.get("space", {}), "variant_of": d.get("variant_of"),
                     "inherit": d.get("inherit", False), "whole_model": False} for a, d in arms.items()},
        "chosen": chosen,
        "workload": {"experiment": "smoke", "budgets": list(budgets), "hybrid": hybrid, "search": search,
                     "overrides": ["schedule=wsd"], "tune_hybrid_lr": False, "tuning_seed": 0},
    }
    if protocol is None:
        del decl["protocol"]
    (root / "bench.json").write_text(json.dumps(decl, indent=2))
    return root


def write_run(root, phase, arm, trial, *, seed, budget, setting, final, evals=None, diverged=False,
              workload=None, timing=None, state_bytes=None, commit=COMMIT, dirty=False, complete=True,
              branch_from=None):
    """A run directory as train.py writes it. Evaluations at `evals` steps (default 0 and the budget): INIT at
    step 0, `final` at the last, linear in between; a diverged run stops evaluating at half its budget."""
    d = root / "runs" / phase / arm / trial
    d.mkdir(parents=True)
    init_seed, data_seed = seed_pair(seed)
    cfg = {"model": dict(MODEL),
           "data": {"name": "kjv", "dir": "data/cache/kjv", "train_pattern": "train_*.bin",
                    "val_pattern": "val_*.bin", "vocab_size": 4096, "val_tokens": VAL_TOKENS, "seed": data_seed,
                    "prepare": "python -m data.prepare kjv --out data/cache/kjv --vocab-size 4096"},
           "optimizer": {"_target_": f"optimizers.{arm}.Spec", "lr": 0.001, "weight_decay": 0.0},
           "schedule": {"name": "wsd", "warmup_frac": 0.05, "warmup_steps": 1, "min_lr_frac": 0.0,
                        "decay_frac": 0.25},
           "train": {"max_steps": budget, "seq_len": SEQ_LEN, "global_batch_size": BATCH,
                     "micro_batch_size": BATCH, "eval_batch_size": 8, "ckpt_steps": [],
                     "branch_from": branch_from, "branch_step": budget - budget // 4 if branch_from else 0},
           "bench": {"name": root.name, "arm": arm, "phase": phase, "trial": trial},
           "diagnostics": {"every": 0},
           "hybrid": {"enabled": True, **HYBRID, "fused": None},
           "seed": init_seed, "name": f"{arm}_s{init_seed}", "experiment": "smoke"}
    for key, value in setting.items():
        section, knob = key.split(".")
        cfg[section][knob] = value
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (d / "env.json").write_text(json.dumps({
        "code": {"commit": commit, "dirty": dirty}, "gpu": None, "device": "cpu",
        "cpu": {"model": "Synthetic CPU", "logical_cores": 2}, "libraries": {"torch": "2.13.0+cpu"}}))
    steps = list(evals or [0, budget])
    last = budget // 2 if diverged else budget
    lines = []
    for s in range(1, last + 1):
        if s % 50 == 0:
            lines.append({"step": s, "tokens": s * TOKENS_PER_STEP, "train_loss": 5.0, "lr": 0.001,
                          "lr_factor": 1.0, "grad_norm": 1.0, "train_time_s": s * 0.01})
    for s in steps:
        if diverged and s > last:
            continue
        loss = INIT + (9.9 - INIT) * s / last if diverged else INIT + (final - INIT) * s / budget
        lines.append({"step": s, "tokens": s * TOKENS_PER_STEP, "train_time_s": s * 0.01, "val_loss": loss})
    lines.sort(key=lambda r: (r["step"], "val_loss" in r))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if not complete:  # still running (or killed): no summary.json
        return d
    opt_s, train_s = timing or (1.0, 10.0)
    summary = {
        "bench": {"arm": arm, "name": root.name, "phase": phase, "trial": trial},
        "branch": {"from": branch_from, "step": budget - budget // 4, "parent_max_steps": BUDGETS[-1]}
        if branch_from else None,
        "data_seed": data_seed, "seed": init_seed, "diverged": diverged,
        "diverged_at_step": last if diverged else None, "diverged_reason": "loss above 1.5x" if diverged else None,
        "experiment": "smoke", "final_val_loss": None if diverged else final,
        "min_val_loss": None if diverged else final, "n_params": N_PARAMS, "optimizer": arm,
        "optimizer_state_bytes": state_bytes, "optimizer_step_time_s": opt_s, "train_time_s": train_s,
        "steps": last, "tokens": last * TOKENS_PER_STEP, "tokens_per_s": 1000.0, "target_loss": None,
        "workload_hash": workload or whash(budget), "world_size": 1}
    (d / "summary.json").write_text(json.dumps(summary, indent=2))
    return d


def make_main_bench(root, target=None):
    """The main benchmark (module docstring). Returns root."""
    arms = {a: {"space": SPACES[a]} for a in ("adamw", "muon", "normuon")}
    arms["v"] = {"optimizer": "muon", "set": {"hybrid.lr": 0.01}, "variant_of": "muon", "inherit": True}
    chosen = {a: {"trial": sid(s), "setting": s, "final_val_loss": TUNE[a][tuple(s.values())]}
              for a, s in CHOSEN.items()}
    chosen["v"] = {**chosen["muon"], "inherited_from": "muon"}
    write_bench(root, arms, chosen=chosen, target=target)
    for arm in ("adamw", "muon", "normuon"):
        kw = {"timing": TIMING[arm], "state_bytes": STATE[arm]}
        for phase, table in (("tune", TUNE), ("cert", CERT)):
            for (lr, wd), loss in table[arm].items():
                setting = {"optimizer.lr": lr, "optimizer.weight_decay": wd}
                write_run(root, phase, arm, sid(setting), seed=0, budget=400, setting=setting, final=loss,
                          evals=[0, 200, 400], diverged=loss is None, **kw)
        for seed in OFFSET[arm]:
            write_run(root, "seed", arm, f"s{seed}", seed=seed, budget=400, setting=CHOSEN[arm],
                      final=end_loss(arm, seed, 400), evals=[0, 100, 200, 300, 400], **kw)
            for budget in BUDGETS[:-1]:
                write_run(root, "branch", arm, f"s{seed}_b{budget}", seed=seed, budget=budget,
                          setting=CHOSEN[arm], final=end_loss(arm, seed, budget), **kw,
                          branch_from=str(root / "runs" / "seed" / arm / f"s{seed}"))
    # muon's seed 4 never finished (no summary.json): not a record, so seed 4 is missing from muon
    write_run(root, "seed", "muon", "s4", seed=4, budget=400, setting=CHOSEN["muon"], final=2.0, complete=False)
    for seed, loss in V_LOSS.items():  # the variant's own workload (its shared lr differs): reported apart
        write_run(root, "seed", "v", f"s{seed}", seed=seed, budget=400, setting={}, final=loss,
                  evals=[0, 100, 200, 300, 400], workload=whash(400, "v"), timing=TIMING["v"],
                  state_bytes=STATE["v"])
    return root


REPORT_OUTPUTS = shutil.ignore_patterns("plots", "report.*", "runs.csv", "summary.json")


def copy_bench(src, dst):
    """A copy of a benchmark's records (no report outputs); run directories' own summary.json are kept."""
    shutil.copytree(src, dst, ignore=lambda d, names: [] if "runs" in Path(d).parts else
                    REPORT_OUTPUTS(d, names))
    return dst


@pytest.fixture(scope="module")
def main_bench(tmp_path_factory, kjv_dir):
    return make_main_bench(tmp_path_factory.mktemp("bench") / "main")


@pytest.fixture(scope="module")
def runs(main_bench):
    return load_runs(main_bench)


@pytest.fixture(scope="module")
def an(main_bench, runs):
    return analyze(main_bench, runs)


@pytest.fixture(scope="module")
def built(main_bench):
    """build_report on the main bench, with every other file's bytes before and after."""
    before = {p: p.read_bytes() for p in main_bench.rglob("*") if p.is_file()}
    out = build_report(main_bench)
    return out, before, {p: p.read_bytes() for p in before}


def t_interval(x):
    x = np.asarray(x, dtype=float)
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


def loglinear(b0, l0, b1, l1, loss):
    """The budget where the line through (log b0, l0), (log b1, l1) has `loss`."""
    return math.exp(math.log(b0) + (loss - l0) / (l1 - l0) * math.log(b1 / b0))


# ------------------------------------------------------------------------------------------------ records

def test_records_fields(main_bench, runs):
    by = {(r.phase, r.arm, r.trial): r for r in runs}
    # tune 3 x 3, cert 2 + 2 + 1, seed 4 + 3 + 4 + 4 (v), branch (4 + 3 + 4) x 2; muon/s4 is incomplete
    assert len(runs) == 9 + 5 + 15 + 22
    assert ("seed", "muon", "s4") not in by
    assert [r.phase for r in runs] == sorted((r.phase for r in runs), key=["tune", "cert", "seed", "branch"].index)
    b = by["branch", "normuon", "s3_b200"]
    assert (b.seed, b.budget, (b.init_seed, b.data_seed)) == (3, 200, seed_pair(3))
    assert b.setting == CHOSEN["normuon"] and b.final_loss == pytest.approx(3.81)
    assert b.hybrid == {"enabled": True, **HYBRID, "fused": None}
    t = by["tune", "adamw", "lr=0.002,weight_decay=0.1"]
    assert (t.seed, t.budget, (t.init_seed, t.data_seed)) == (0, 400, seed_pair(0))
    assert t.setting == {"optimizer.lr": 0.002, "optimizer.weight_decay": 0.1}
    assert [e["step"] for e in t.evals] == [0, 200, 400] and t.evals[0]["val_loss"] == INIT
    d = by["tune", "normuon", "lr=0.04,weight_decay=0.1"]
    assert d.diverged and d.final_loss == math.inf
    assert by["seed", "v", "s1"].setting == {}  # an inheriting variant has no tuned axes of its own
    assert load_run(main_bench / "runs" / "seed" / "muon" / "s4", ["optimizer.lr"]) is None


# ------------------------------------------------------------------------------------- losses and curves

def test_end_losses_per_budget_per_seed(an):
    for arm in ("adamw", "muon", "normuon"):
        a = an["arms"][arm]
        expected = {B: {s: end_loss(arm, s, B) for s in OFFSET[arm]} for B in BUDGETS}
        assert a["budgets"] == BUDGETS
        assert a["losses"] == expected  # (exact: the values written) branch runs at 100 and 200, seed runs at 400
        assert a["curve"] == pytest.approx([CURVE[arm][B] for B in BUDGETS])  # the median over seeds
    assert an["arms"]["muon"]["n_seeds"] == 3 and an["arms"]["adamw"]["n_seeds"] == 4
    v = an["arms"]["v"]
    assert v["budgets"] == [400] and v["losses"] == {400: V_LOSS}
    assert v["curve"] == [pytest.approx((3.0 + 3.02) / 2)]


def test_end_loss_interval(an):
    e = an["arms"]["adamw"]["end_loss"]
    x = [3.1, 3.15, 3.25, 3.4]
    assert e["n"] == 4 and e["method"] == "t"
    assert e["median"] == pytest.approx(3.2) and e["mean"] == pytest.approx(3.225)
    assert (e["lo"], e["hi"]) == pytest.approx(t_interval(x))


def test_target_is_reference_fresh_seed_median(an):
    # adamw's fresh seeds at 400: 3.1, 3.15, 3.25, 3.4 -> median 3.2 (mean 3.225; the tuning seed's 3.05 and a
    # median that took it in, 3.15, would both show)
    assert an["target"]["loss"] == pytest.approx(3.2)
    assert "median end-of-schedule loss at the full budget over its fresh seeds" in an["target"]["rule"]
    assert "(adamw)" in an["target"]["rule"]


def test_steps_to_target_loglinear(an):
    arms = an["arms"]
    # adamw's curve ends exactly at the target: 400
    assert arms["adamw"]["steps_to_target"]["value"] == pytest.approx(400)
    # muon crosses 3.2 between (200, 3.4) and (400, 3.0): 200 * 2 ** 0.5
    s = arms["muon"]["steps_to_target"]
    assert s["reached"] and s["where"] == "interpolated"
    assert s["value"] == pytest.approx(loglinear(200, 3.4, 400, 3.0, 3.2)) == pytest.approx(200 * 2 ** 0.5)
    assert arms["normuon"]["steps_to_target"] == {"value": None, "reached": False, "where": "not_reached"}
    # the first-evaluation reading of the full-budget seed runs (evaluations every 100 steps; at 300 every
    # run is still above 4): adamw seeds 1, 2 reach 3.2 at step 400, seeds 3, 4 never
    # (an unreached seed counts as +inf, so 2 of 4: the median (400 + inf) / 2 is +inf, "not reached")
    assert arms["adamw"]["first_eval_reached"] == 2 and arms["adamw"]["first_eval_steps_to_target"] == math.inf
    assert arms["muon"]["first_eval_reached"] == 3 and arms["normuon"]["first_eval_reached"] == 0


def test_declared_target(tmp_path, kjv_dir):
    root = make_main_bench(tmp_path / "declared", target=3.5)
    an = analyze(root, load_runs(root))
    assert an["target"] == {"loss": 3.5, "rule": "declared before any run (declared a priori)"}
    arms = an["arms"]
    assert arms["adamw"]["steps_to_target"]["value"] == pytest.approx(200 * 2 ** 0.25)  # (3.6 - 3.5) / 0.4
    assert arms["muon"]["steps_to_target"]["value"] == pytest.approx(loglinear(100, 3.8, 200, 3.4, 3.5))
    assert arms["normuon"]["steps_to_target"]["value"] == pytest.approx(loglinear(200, 3.8, 400, 3.4, 3.5))
    assert arms["adamw"]["first_eval_reached"] == 4  # every adamw seed ends at or below 3.5


# ---------------------------------------------------------------------------------- paired comparisons

def hand_paired(arm, ref):
    """(seeds, differences, mean, (lo, hi), one-sided p) by hand at the full budget."""
    a = {s: end_loss(arm, s, 400) for s in OFFSET[arm]} if arm != "v" else V_LOSS
    r = {s: end_loss(ref, s, 400) for s in OFFSET[ref]}
    seeds = sorted(a.keys() & r.keys())
    x, y = [a[s] for s in seeds], [r[s] for s in seeds]
    d = np.subtract(x, y)
    return seeds, d, d.mean(), t_interval(d), sps.ttest_rel(x, y, alternative="less").pvalue


def test_paired_difference_by_seed(an):
    tests = an["tests"]
    assert list(tests) == ["muon vs adamw", "normuon vs adamw", "normuon vs muon", "v vs muon"]
    for key, t in tests.items():
        arm, ref = key.split(" vs ")
        seeds, d, mean, (lo, hi), p = hand_paired(arm, ref)
        assert t["against"] == ref
        assert t["seeds"] == seeds and t["n"] == len(seeds)
        assert t["mean_diff"] == pytest.approx(mean, abs=1e-12)
        assert (t["lo"], t["hi"]) == pytest.approx((lo, hi), abs=1e-12)
        assert t["p"] == pytest.approx(p, rel=1e-9)
        # the minimum detectable difference at the measured spread and n (bench/stats.py's, tested there)
        assert t["mdd"] == pytest.approx(stats.min_detectable_difference(d.std(ddof=1), len(d)))
        assert 0 < t["mdd"] < math.inf
    # muon's seed 4 is missing: seeds 1-3 pair; d = (2.92 - 3.1, 3.0 - 3.15, 3.03 - 3.25)
    assert tests["muon vs adamw"]["seeds"] == [1, 2, 3]
    assert tests["muon vs adamw"]["mean_diff"] == pytest.approx((-0.18 - 0.15 - 0.22) / 3)
    assert tests["normuon vs adamw"]["seeds"] == [1, 2, 3, 4]
    assert tests["v vs muon"]["seeds"] == [1, 2, 3]


def test_holm_over_every_test(an):
    tests = an["tests"]
    ps = {k: t["p"] for k, t in tests.items()}
    order = sorted(ps, key=ps.get)
    m, running, expected = len(order), 0.0, {}
    for i, k in enumerate(order):  # Holm: max over j <= i of min(1, (m - j) p_(j))
        running = max(running, min(1.0, (m - i) * ps[k]))
        expected[k] = running
    assert m == 4
    assert {k: t["p_holm"] for k, t in tests.items()} == pytest.approx(expected, rel=1e-12)
    assert tests["muon vs adamw"]["p_holm"] == pytest.approx(4 * ps["muon vs adamw"])  # the smallest p


def test_exchange_rate(an):
    t = an["tests"]["muon vs adamw"]
    # adamw's curve near its full-budget loss 3.2: the segment (200, 3.6)-(400, 3.2), 0.4 / 200 per step
    assert t["exchange_rate"] == pytest.approx(0.002)
    assert t["steps_equivalent"] == pytest.approx(t["mean_diff"] / 0.002)


def test_data_equivalent_speedup(an):
    arms = an["arms"]
    # muon ends at 3.0, below every adamw budget: along adamw's last segment, 200 * 2 ** 1.5 adamw steps
    d = arms["muon"]["data_equivalent_speedup"]
    assert d["extrapolated"] and d["value"] == pytest.approx(200 * 2 ** 1.5 / 400)
    # ... so the headline quotes the largest budget needing no extrapolation: at 200 muon's 3.4 is adamw's at
    # 200 * 2 ** 0.5 steps (between its 200 and 400), a speedup of 2 ** 0.5
    by = arms["muon"]["data_equivalent_by_budget"]
    assert not by[200]["extrapolated"] and by[200]["value"] == pytest.approx(2 ** 0.5)
    # normuon ends at 3.4: adamw reaches it between 200 (3.6) and 400 (3.2), at 200 * 2 ** 0.5
    d = arms["normuon"]["data_equivalent_speedup"]
    assert not d["extrapolated"] and d["value"] == pytest.approx(loglinear(200, 3.6, 400, 3.2, 3.4) / 400)
    assert d["value"] == pytest.approx(2 ** -0.5)
    d = arms["adamw"]["data_equivalent_speedup"]
    assert d["value"] == pytest.approx(1.0) and not d["extrapolated"]
    assert "muon: its data-equivalent speedup is extrapolated beyond the reference's budgets" in an["flags"]
    assert not any(f.startswith("normuon: its data") for f in an["flags"])


def test_overhead_and_state(an):
    arms = an["arms"]
    assert arms["adamw"]["step_overhead"] == pytest.approx(2 / 8)
    assert arms["muon"]["step_overhead"] == pytest.approx(5 / 5)
    assert arms["normuon"]["step_overhead"] == pytest.approx(3 / 6)
    assert arms["muon"]["state_ratio"] == pytest.approx(0.5)
    assert arms["normuon"]["state_ratio"] == pytest.approx(0.75)
    assert arms["adamw"]["state_ratio"] == 1.0
    assert arms["v"]["state_ratio"] == pytest.approx(1000 / 800)  # a whole-model variant's memory claim
    assert arms["muon"]["tokens_per_step"] == TOKENS_PER_STEP


# ------------------------------------------------------------------------------------------- tuning

def test_certificates(an):
    cert = {(a, row["axis"]): row for a in ("adamw", "muon", "normuon") for row in an["arms"][a]["certificate"]}
    lr, wd = cert["adamw", "optimizer.lr"], cert["adamw", "optimizer.weight_decay"]
    assert (lr["down"], lr["up"]) == ({"value": 0.002, "loss": 3.3}, {"value": 0.008, "loss": 3.2})  # tune runs
    assert (wd["down"], wd["up"]) == ({"value": 0.05, "loss": 3.1}, {"value": 0.2, "loss": 3.0})  # cert runs
    assert not lr["edge"] and not lr["beaten"] and not wd["edge"] and wd["beaten"] and wd["complete"]
    lr = cert["muon", "optimizer.lr"]
    assert lr["edge"] and lr["up"] is None and lr["down"] == {"value": 0.02, "loss": 2.9} and not lr["beaten"]
    wd = cert["muon", "optimizer.weight_decay"]
    assert not wd["edge"] and not wd["beaten"] and wd["down"]["loss"] == 2.85
    lr, wd = cert["normuon", "optimizer.lr"], cert["normuon", "optimizer.weight_decay"]
    assert lr["up"] == {"value": 0.04, "loss": math.inf} and not lr["beaten"]  # diverged neighbour
    assert wd["up"] == {"value": 0.2, "loss": None} and not wd["complete"] and not wd["beaten"]
    assert an["arms"]["v"]["certificate"] == []
    flags = an["flags"]
    assert "adamw: the chosen optimizer.weight_decay=0.1 is beaten by a neighbour" in flags
    assert "muon: the chosen optimizer.lr=0.04 is at the edge of its range" in flags
    assert not any(f.startswith("normuon: the chosen") for f in flags)
    assert [an["arms"][a]["n_cert_runs"] for a in ("adamw", "muon", "normuon")] == [2, 2, 1]


def test_equal_trials_and_best_of_k(an):
    arms = an["arms"]
    assert [arms[a]["n_trials"] for a in ("adamw", "muon", "normuon")] == [3, 3, 3]
    assert arms["v"]["n_trials"] == 0 and arms["v"]["best_of_k"] == []
    assert arms["normuon"]["n_diverged"] == 1 and arms["adamw"]["n_diverged"] == 0
    trial = {t["trial"]: t for t in arms["normuon"]["trials"]}["lr=0.04,weight_decay=0.1"]
    assert trial["diverged"] and trial["loss"] == math.inf

    def by_hand(losses):  # the mean of the best of every k-subset; a diverged trial scores the initial loss
        v = [INIT if x is None else x for x in losses]
        return [np.mean([min(c) for c in itertools.combinations(v, k)]) for k in range(1, len(v) + 1)]

    for arm in ("adamw", "muon", "normuon"):
        assert arms[arm]["best_of_k"] == pytest.approx(by_hand(TUNE[arm].values()), abs=1e-12)
    assert arms["normuon"]["best_of_k"] == pytest.approx([(3.3 + 3.1 + 8) / 3, (3.1 + 3.1 + 3.3) / 3, 3.1])


# -------------------------------------------------------------------------------- baselines and flags

def test_baselines_from_the_real_data(an, kjv_dir):
    data = TokenData(str(kjv_dir), DataConfig(val_tokens=VAL_TOKENS), SEQ_LEN)
    direct = baselines(data, SEQ_LEN, 8)
    base = an["baselines"]
    assert {k: base[k] for k in ("unigram", "bigram", "trigram", "train_tokens")} == \
        {k: direct[k] for k in ("unigram", "bigram", "trigram", "train_tokens")}
    assert base["train_tokens"] == sum(s["tokens"] for s in data.meta["train_shards"])
    # the reference ends at 3.2, below the real bigram and trigram lines (about 3.92 and 3.52): no flag
    assert 3.2 < base["trigram"] < base["bigram"]
    assert not any("n-gram" in f or "baseline" in f for f in an["flags"])
    w = an["workload"]
    assert w["epochs"] == pytest.approx(400 * TOKENS_PER_STEP / base["train_tokens"])


@pytest.mark.parametrize("lines, expected", [
    ({"bigram": 3.0, "trigram": 2.5},
     ("measures n-gram learning, not optimization of a language model: the reference arm ends at 3.2000, above "
      "the bigram baseline 3.0000")),
    ({"bigram": 3.5, "trigram": 3.1},
     "the reference arm ends at 3.2000, below the bigram baseline 3.5000 but above the trigram baseline 3.1000"),
    ({"bigram": 3.5, "trigram": 3.3}, None),
])
def test_ngram_flag(main_bench, runs, monkeypatch, lines, expected):
    monkeypatch.setattr(analysis_mod, "ngram_lines", lambda cfg: {"unigram": 5.0, **lines, "train_tokens": 10**6})
    an = analyze(main_bench, runs)
    base_flags = [f for f in an["flags"] if "baseline" in f]
    assert base_flags == ([expected] if expected else [])
    assert an["workload"]["epochs"] == pytest.approx(400 * TOKENS_PER_STEP / 10**6)


def test_missing_data_means_no_baselines(main_bench, runs, monkeypatch):
    monkeypatch.setattr(analysis_mod, "ngram_lines", lambda cfg: None)
    an = analyze(main_bench, runs)
    assert an["baselines"] is None and an["workload"]["epochs"] is None
    assert summary(an)["baselines"] == {"unigram": None, "bigram": None, "trigram": None}


def test_workload_and_code(an):
    w = an["workload"]
    assert (w["n_params"], w["non_embedding_params"]) == (N_PARAMS, NON_EMBEDDING)
    assert w["tokens_per_step"] == TOKENS_PER_STEP and w["budgets"] == BUDGETS and w["seq_len"] == SEQ_LEN
    assert an["code_versions"] == [COMMIT[:12]]
    assert an["few_seeds"]  # 3 and 4 seeds: fewer than 5


# --------------------------------------------------------------------------------------------- refusals

def test_mixed_workloads_refused(main_bench, tmp_path, capsys):
    for phase, arm, trial, budget in (("seed", "muon", "s1", 400), ("branch", "adamw", "s2_b100", 100)):
        root = copy_bench(main_bench, tmp_path / f"mixed_{budget}")
        path = root / "runs" / phase / arm / trial / "summary.json"
        path.write_text(path.read_text().replace(whash(budget), whash(budget, "x")))
        with pytest.raises(RecordError, match=f"at budget {budget}: runs of 2 workloads.*never compared"):
            analyze(root, load_runs(root))
    assert main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report: ") and "never compared" in err and err.count("\n") == 1
    assert not (root / "report.md").exists() and not (root / "summary.json").exists()


def test_not_a_benchmark_refused(tmp_path, kjv_dir):
    with pytest.raises(RecordError, match="no bench.json"):
        build_report(tmp_path)
    root = write_bench(tmp_path / "no_seeds", {"adamw": {"space": SPACES["adamw"]}}, chosen={})
    write_run(root, "tune", "adamw", "lr=0.004,weight_decay=0.1", seed=0, budget=400,
              setting=CHOSEN["adamw"], final=3.0)
    with pytest.raises(RecordError, match="no complete seed run"):
        build_report(root)
    for protocol in (1, None):  # protocol 1 (or a v1 bench.json without the key)
        old = copy_bench(root, tmp_path / f"v{protocol}")
        bench = json.loads((old / "bench.json").read_text())
        bench.pop("protocol")
        if protocol:
            bench["protocol"] = protocol
        (old / "bench.json").write_text(json.dumps(bench))
        with pytest.raises(RecordError, match="protocol v1 benchmark; this report reads v2"):
            build_report(old)


def test_cli_refuses_a_non_benchmark_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a benchmark")
    proc = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("report: ")
    assert "is not a benchmark directory (no bench.json" in proc.stderr


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


def test_diverged_fresh_seed_is_flagged(main_bench, tmp_path, an, kjv_dir):
    """A fresh seed that diverged is recorded (+inf), left out of the numbers that need finite losses (medians,
    intervals, paired tests) and named in the flags, never dropped silently."""
    assert not any("diverged" in f for f in an["flags"])
    root = copy_bench(main_bench, tmp_path / "diverged")
    path = root / "runs" / "seed" / "normuon" / "s2" / "summary.json"
    s = json.loads(path.read_text())
    path.write_text(json.dumps({**s, "diverged": True, "final_val_loss": None, "diverged_at_step": 300}))
    an = analyze(root, load_runs(root))
    a = an["arms"]["normuon"]
    assert a["losses"][400][2] == math.inf and a["n_seeds"] == 4
    assert a["end_loss"]["n"] == 3 and a["end_loss"]["median"] == pytest.approx(3.41)  # 3.38, 3.41, 3.44
    assert an["tests"]["normuon vs adamw"]["seeds"] == [1, 3, 4]
    assert ("normuon: fresh-seed runs diverged (s2 at 400); left out of its medians, intervals and paired tests"
            in an["flags"])


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
