"""The benchmark engine (bench/, protocol v2): declarations are checked before any run, the search is the same
for every arm with an equal trial count, seeds are paired, every main arm gets the identical shared group,
branches start where the budgets' cooldowns start, and a real (seconds-long) benchmark runs end to end through
Hydra's joblib multirun, is resumable, and refuses another workload."""

import math

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench.declaration import Axis, BenchError, load_bench, seed_pair
from bench.plan import branch_runs, cooldown_start, seed_runs, trial_config
from bench.run import _tune_run, certificate_runs
from bench.search import certificate_points, coordinate_rounds, qmc_points, setting_id
from harness.config.schema import register_configs

LR = {"default": 3.0e-3, "low": 1.0e-4, "high": 3.0e-2, "step": 3.1623, "source": "test"}
WD = {"default": 0.1, "low": 0.01, "high": 1.0, "step": 3.1623, "source": "test"}
MUON_LR = {"default": 0.02, "low": 2.0e-3, "high": 0.2, "step": 3.1623, "source": "test"}


def declaration(**changes):
    d = {"name": "t", "protocol": 2, "experiment": "smoke",
         "overrides": ["schedule=wsd", "schedule.warmup_steps=1", "schedule.decay_frac=0.25",
                       "schedule.min_lr_frac=0.0"],
         "budgets": [4, 8, 12], "hybrid": {"lr": 3.0e-3, "source": "test"},
         "search": {"method": "coordinate", "trials": 3}, "reference": "adamw", "muon_variants": [],
         "tuning_seed": 0, "seeds": [1, 2, 3], "launcher": "joblib", "jobs": 2, "threads": 1, "logger": "wandb",
         "arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}},
                  "muon": {"optimizer": "muon", "space": {"optimizer.lr": MUON_LR, "optimizer.weight_decay": WD}}}}
    d.update(changes)
    return d


def write(tmp_path, d, name="bench.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(d))
    return str(path)


def arm(**kw):
    return {"optimizer": "adamw", "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}, **kw}


@pytest.mark.parametrize("changes, message", [
    ({"budgets": [4, 8]}, "bench.budgets: need >= 3 distinct ascending positive step budgets"),
    ({"seeds": [1, 2]}, "bench.seeds: need >= 3 distinct fresh seeds"),
    ({"seeds": [0, 1, 2]}, "other than the tuning seed 0"),
    ({"protocol": 1}, "bench.protocol: this harness runs protocol version 2"),
    ({"search": {"method": "grid"}}, "bench.search.method: 'grid' is not one of coordinate, qmc"),
    ({"arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": LR}}}},
     "bench.arms.adamw.space: need >= 2 tuned knobs"),
    ({"arms": {"adamw": arm(space={"optimizer.lr": {**LR, "source": " "}, "optimizer.weight_decay": WD})}},
     "bench.arms.adamw.space.optimizer.lr.source: every default and range needs its source"),
    ({"arms": {"adamw": arm(space={"optimizer.lr": {**LR, "default": 1.0}, "optimizer.weight_decay": WD})}},
     "need 0 < low <= default <= high"),
    ({"arms": {"adamw": arm(space={"optimizer.aux.lr": LR, "optimizer.weight_decay": WD})}},
     "'optimizer.aux.lr' belongs to the workload"),
    ({"arms": {"adamw": arm(set={"hybrid.lr": 0.01})}}, "a variant arm \\(variant_of\\) may set the shared group"),
    ({"overrides": ["optimizer.lr=1"]}, "bench.overrides: 'optimizer.lr=1': the optimizer is the arm's"),
    ({"target": {"loss": 4.0}}, "bench.target.source: a declared target needs its source"),
    ({"reference": "sgd"}, "the reference/compared arm 'sgd' is not a declared main arm"),
    ({"arms": {"adamw": arm(), "v": {"optimizer": "muon", "variant_of": "adamw", "inherit": True}}},
     "bench.arms.v.inherit: inherits the setting of an arm with another optimizer"),
    ({"overrides": ["schedule=wsd", "schedule.warmup_frac=0.1"]}, "its warmup must be in steps"),
    ({"trials": 2}, "bench.trials: Key 'trials' not in 'BenchConfig'"),
])
def test_bad_declarations_fail_before_any_run(tmp_path, changes, message):
    with pytest.raises(BenchError, match=message.replace("[", r"\[")):
        load_bench(write(tmp_path, declaration(**changes)))


def test_every_shipped_benchmark_is_valid():
    for path in sorted((REPO / "conf" / "bench").glob("*.yaml")):
        b = load_bench(str(path))
        assert len(b.seeds) >= 3 and len(b.budgets) >= 3, path.name
        assert all(len(b.space(a)) >= 2 for a in b.arms if not b.arms[a].inherit), path.name


def test_coordinate_descent_takes_exactly_the_budget_and_walks_to_the_best():
    """Exactly `trials` settings for any loss surface; on a bowl centred on a grid point it reaches that point,
    each round changing one axis."""
    space = {"optimizer.lr": Axis(**LR), "optimizer.weight_decay": Axis(**WD)}
    target = {"optimizer.lr": 3.0e-3 * 3.1623, "optimizer.weight_decay": 0.1 / 3.1623 ** 2}

    def bowl(s):
        return sum(math.log(s[k] / target[k]) ** 2 for k in s)

    for trials in (2, 5, 9, 14):
        rounds, done = coordinate_rounds(space, trials, bowl)
        flat = [setting_id(s) for r in rounds for s in r]
        assert done and len(flat) == trials == len(set(flat))
    rounds, _ = coordinate_rounds(space, 9, bowl)
    best = min((s for r in rounds for s in r), key=bowl)
    assert best == {k: float(f"{v:.4g}") for k, v in target.items()}
    assert [len(r) for r in rounds[:2]] == [3, 2]  # defaults + lr neighbours, then wd neighbours of the best
    pending, done = coordinate_rounds(space, 5, lambda s: None)
    assert not done and len(pending) == 1 and len(pending[0]) == 3


def test_grid_points_are_exact_whatever_the_path():
    ax = Axis(**LR)
    up = ax.neighbours(3.0e-3)[1]
    assert ax.neighbours(up)[0] == 3.0e-3  # down from up is the default, exactly (no 0.002999)
    assert ax.neighbours(3.0e-2)[1] is None and ax.neighbours(3.0e-2)[0] == float(f"{3.0e-2 / 3.1623:.4g}")
    assert ax.neighbours(3.0e-3, level=1) == (float(f"{3.0e-3 / 3.1623 ** 0.5:.4g}"),
                                              float(f"{3.0e-3 * 3.1623 ** 0.5:.4g}"))


def test_qmc_is_the_same_design_for_every_arm_and_inside_the_ranges():
    a = {"optimizer.lr": Axis(**LR), "optimizer.weight_decay": Axis(**WD)}
    b = {"optimizer.lr": Axis(**MUON_LR), "optimizer.weight_decay": Axis(**WD)}
    pa, pb = qmc_points(a, 8, 0), qmc_points(b, 8, 0)
    assert len(pa) == 8 and len({setting_id(p) for p in pa}) == 8
    for x, y in zip(pa, pb):  # the same unit point, mapped log-uniformly onto each arm's own range
        ux = math.log(x["optimizer.lr"] / 1e-4) / math.log(3e-2 / 1e-4)
        uy = math.log(y["optimizer.lr"] / 2e-3) / math.log(0.2 / 2e-3)
        assert ux == pytest.approx(uy, abs=1e-3) and 0 <= ux < 1
        assert x["optimizer.weight_decay"] == y["optimizer.weight_decay"]


def test_certificate_neighbours_and_edges():
    space = {"optimizer.lr": Axis(**LR), "optimizer.weight_decay": Axis(**WD)}
    pts = certificate_points(space, {"optimizer.lr": 3.0e-2, "optimizer.weight_decay": 0.1})
    assert [(k.split(".")[-1], side, s is None) for k, side, s in pts] == [
        ("lr", "down", False), ("lr", "up", True), ("weight_decay", "down", False), ("weight_decay", "up", False)]


def test_seeds_are_paired_and_init_and_data_seeds_independent():
    pairs = [seed_pair(s) for s in range(50)]
    assert len({p for p in pairs}) == 50 and all(i != d for i, d in pairs)
    assert pairs[3] == seed_pair(3)  # a pure function: the same in every arm and every relaunch


def _compose(tmp_path, b, run, hybrid):
    """The resolved run config Hydra composes for this planned run (as the multirun does)."""
    (tmp_path / "conf" / "trial").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "trial" / "x.yaml").write_text(trial_config(b, run, hybrid, tmp_path))
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="t"):
        cfg = compose("config", overrides=[f"experiment={b.experiment}", *b.overrides,
                                           f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+trial=x", "name=t"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_every_main_arm_resolves_to_the_identical_shared_group_and_paired_seeds(tmp_path):
    d = declaration(arms={"adamw": arm(), "muon": {"optimizer": "muon", "space": {"optimizer.lr": MUON_LR,
                                                                                 "optimizer.weight_decay": WD}},
                          "lion": {"optimizer": "lion", "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}},
                          "mini_whole": {"optimizer": "adam_mini", "variant_of": "adamw", "whole_model": True,
                                         "space": {"optimizer.lr": LR, "optimizer.weight_decay": WD}}})
    b = load_bench(write(tmp_path, d))
    hybrid = {"lr": 3.0e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "decay_groups": ["embedding",
                                                                                                     "head"]}
    resolved = {a: _compose(tmp_path, b, seed_runs(b, a, {})[1], hybrid) for a in ("adamw", "muon", "lion")}
    shared = {a: c["hybrid"] for a, c in resolved.items()}
    assert all(s == {"enabled": True, **hybrid, "fused": None} for s in shared.values())
    assert len({(c["seed"], c["data"]["seed"]) for c in resolved.values()}) == 1  # seed 2: paired
    assert resolved["adamw"]["seed"], resolved["adamw"]["data"]["seed"] == seed_pair(2)
    assert {c["train"]["max_steps"] for c in resolved.values()} == {12}
    whole = _compose(tmp_path, b, seed_runs(b, "mini_whole", {})[0], hybrid)
    assert whole["hybrid"]["enabled"] is False  # the whole-model variant owns every tensor


def test_seed_runs_keep_the_branch_checkpoints_and_branches_start_at_each_cooldown(tmp_path):
    b = load_bench(write(tmp_path, declaration()))
    seeds = seed_runs(b, "adamw", {"optimizer.lr": 3e-3})
    assert [(r.trial, r.budget, r.ckpt_steps) for r in seeds] == [(f"s{s}", 12, [3, 6]) for s in (1, 2, 3)]
    branches = branch_runs(b, "adamw", {"optimizer.lr": 3e-3})
    assert [(r.trial, r.budget, r.branch_step, r.branch_from) for r in branches[:2]] == [
        ("s1_b4", 4, 3, "runs/seed/adamw/s1"), ("s1_b8", 8, 6, "runs/seed/adamw/s1")]
    assert cooldown_start(8, 0.25) == 6 and cooldown_start(4, 0.25) == 3
    cosine = load_bench(write(tmp_path, declaration(overrides=[]), "c.yaml"))  # no WSD: one run per budget
    assert [(r.trial, r.budget) for r in seed_runs(cosine, "adamw", {})][:3] == [("s1_b4", 4), ("s1_b8", 8),
                                                                                 ("s1_b12", 12)]
    assert branch_runs(cosine, "adamw", {}) == []


def test_reference_first_tuning_ties_the_shared_group_to_its_own_knobs(tmp_path):
    b = load_bench(write(tmp_path, declaration(hybrid={"source": "test", "from_reference": True})))
    r = _tune_run(b, "adamw", {"optimizer.lr": 1e-2, "optimizer.weight_decay": 0.3}, tie=True)
    assert r.trial == "lr=0.01,weight_decay=0.3"
    c = _compose(tmp_path, b, r, {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                  "decay_groups": ["embedding", "head"]})
    assert (c["hybrid"]["lr"], c["hybrid"]["weight_decay"]) == (1e-2, 0.3)
    assert (c["optimizer"]["lr"], c["optimizer"]["weight_decay"]) == (1e-2, 0.3)


def test_setting_ids_name_non_optimizer_keys_in_full():
    """The tune_hybrid_lr ablation tunes hybrid.lr beside optimizer.lr: the ids must tell them apart."""
    assert setting_id({"optimizer.lr": 0.02, "optimizer.weight_decay": 0.1, "hybrid.lr": 0.003}) == \
        "lr=0.02,weight_decay=0.1,hybrid.lr=0.003"
    b = load_bench(str(REPO / "conf" / "bench" / "tiny.yaml"), tune_hybrid_lr=True)
    assert list(b.space("muon")) == ["optimizer.lr", "optimizer.weight_decay", "hybrid.lr"]
    assert b.space("muon")["hybrid.lr"].default == b.hybrid.lr and b.space("adam_mini_whole") == {}


def test_reference_certificate_runs_keep_the_tie(tmp_path):
    b = load_bench(write(tmp_path, declaration(hybrid={"source": "test", "from_reference": True},
                                               search={"method": "qmc", "trials": 2})))
    runs = certificate_runs(b, tmp_path / "out", "adamw",
                            {"setting": {"optimizer.lr": 3.0e-3, "optimizer.weight_decay": 0.1}})
    assert len(runs) == 4 and all(r.phase == "cert" for r in runs)
    for r in runs:
        assert (r.setting["hybrid.lr"], r.setting["hybrid.weight_decay"]) == (
            r.setting["optimizer.lr"], r.setting["optimizer.weight_decay"])
        assert r.trial == setting_id({k: v for k, v in r.setting.items() if k.startswith("optimizer.")})
    assert all("hybrid.lr" not in r.setting for r in certificate_runs(
        b, tmp_path / "out", "muon", {"setting": {"optimizer.lr": 0.02, "optimizer.weight_decay": 0.1}}))


def test_the_standard_workload_meets_the_static_bars_and_the_tiny_one_does_not():
    """The two workload bars that need no run (bench/analysis.py workload_checks), on the shipped declarations'
    composed models: the standard benchmark is 82.9% non-embedding (396,800 of 478,720: GPT-2, 2 layers x
    (12 d^2 + 13 d) + 2 d at d 128) with 3,969,024 / 396,800 = 10.0 tokens per parameter; `make bench`'s tiny
    workload misses the share (its report flags it)."""
    from bench.analysis import workload_checks
    from bench.declaration import composed
    from bench.rungs import model_size

    for name, share_ok in (("standard", True), ("tiny", False)):
        b = load_bench(name)
        size = model_size(composed(b))
        w = {**size, "budgets": list(b.budgets), "epochs": None}
        share, per_param, _, _ = workload_checks(w, None, None)
        assert share["ok"] is share_ok and (name != "standard" or per_param["ok"] is True)
        if name == "standard":
            assert (size["n_params"], size["non_embedding_params"]) == (478_720, 396_800)
            assert 2 * (12 * 128**2 + 13 * 128) + 2 * 128 == 396_800
            assert per_param["value"] == pytest.approx(969 * 4096 / 396_800)
