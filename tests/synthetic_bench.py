"""A synthetic protocol-v2 benchmark directory for the report tests (tests/test_analysis.py, tests/test_report.py,
tests/test_report_diagnostics.py), laid out exactly like scripts/bench.py's (bench.json and
runs/<phase>/<arm>/<trial>/ with config.yaml, env.json, metrics.jsonl, summary.json), with losses chosen here so
that every number the tests assert is computed by hand (docs/protocol.md v2 definitions).

The main benchmark: budgets 100, 200, 400 (WSD: seed runs at 400, cooldown branches at 100 and 200), seeds
1-4, coordinate search with 3 trials per arm, the reference adamw, muon (the Muon reference), normuon (a Muon
variant of the main comparison) and v (a variant arm of muon that inherits its setting). End-of-schedule loss
of arm a, seed s, budget B: CURVE[a][B] + OFFSET[a][s]; the offsets' median is 0, so the medians over seeds
are the CURVE values: adamw 4.0, 3.6, 3.2 (the target: its fresh-seed median at 400; its tuning-seed loss is
3.05), muon 3.8, 3.4, 3.0 (seed 4 never finished), normuon 4.2, 3.8, 3.4.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from bench.analysis import analyze
from bench.declaration import seed_pair
from bench.records import load_runs
from bench.report import build_report

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
# summary.json timings (optimizer.step() s, training s), optimizer state bytes and charged FLOPs per step per arm
TIMING = {"adamw": (2.0, 10.0), "muon": (5.0, 10.0), "normuon": (3.0, 9.0), "v": (4.0, 12.0)}
STATE = {"adamw": 800, "muon": 400, "normuon": 600, "v": 1000}
FLOPS = {"adamw": 3.0e7, "muon": 3.3e7, "normuon": 3.4e7, "v": 3.3e7}


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
              workload=None, timing=None, state_bytes=None, flops=None, commit=COMMIT, dirty=False, complete=True,
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
        "flops_per_step": flops,
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
        kw = {"timing": TIMING[arm], "state_bytes": STATE[arm], "flops": FLOPS[arm]}
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
                  state_bytes=STATE["v"], flops=FLOPS["v"])
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

