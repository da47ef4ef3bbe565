"""Any torch.optim.Optimizer by `_target_` (optimizers/external.py) and the shipped zoo YAMLs: SGD's step by hand
on the hidden matrices beside the auxiliary AdamW's, `_params_: all` and the shared group, one-line refusals
(an unknown argument, a value the class refuses) through the preflight and prepare_run, Schedule-Free's
evaluation on its average x with the training trajectory untouched and a bit-exact resume, LBFGS's closure and
its count, every zoo YAML through train.py, a benchmark arm of the zoo, and scripts/perf.py listing them.
Runs are in-process (prepare_run + train.train, as tests/test_policies.py), on GPT-2 micro."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, read_jsonl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from bench.declaration import BenchError, load_bench
from bench.plan import trial_config
from bench.run import _tune_run, run_benchmark
from harness.config.preflight import preflight
from harness.config.schema import ConfigError, register_configs, to_typed
from harness.config.validate import validate
from harness.lifecycle.prepare import build_trainable, prepare_run
from optimizers.external import ExternalOptimizer, ExternalSpec
from optimizers.hybrid import CombinedOptimizer
from scripts import perf
from train import train

ZOO = {"schedulefree_adamw": ("schedulefree.AdamWScheduleFree", "schedulefree 1.4.1"),
       "psgd_kron": ("pytorch_optimizer.Kron", "pytorch_optimizer 4.1.0"),
       "shampoo": ("pytorch_optimizer.Shampoo", "pytorch_optimizer 4.1.0")}
FAST = ("experiment=smoke", "model=gpt2_micro", "logger=none", "name=test", "train.threads=1", "train.progress=false")
SGD = {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9}


def composed(*overrides, optimizer=None):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="test"):
        cfg = compose("config", overrides=[*FAST, *overrides])
    if optimizer is not None:
        with open_dict(cfg):
            cfg.optimizer = OmegaConf.create(optimizer)
    return cfg


def built(optimizer, *overrides):
    cfg = to_typed(composed(*overrides, optimizer=optimizer))
    return build_trainable(cfg, validate(cfg), torch.device("cpu"))


def gradients(model, seed=0):
    """Gradients of the loss on a fixed random batch, {parameter: grad}."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, 4096, (4, 33), generator=gen)
    model.zero_grad(set_to_none=True)
    model(batch[:, :-1], batch[:, 1:])[1].backward()
    return {p: p.grad.clone() for p in model.parameters()}


def losses(run_dir):
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in read_jsonl(run_dir / "metrics.jsonl")]


def val_loss(run, model) -> float:
    """train.py's evaluate() without its eval_weights: whatever weights the model holds now."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in run.data.val_batches(run.cfg.train.eval_batch_size):
            total += model(x, y)[1].item() * y.numel()
            count += y.numel()
    model.train()
    return total / count


def test_sgd_steps_the_hidden_matrices_by_hand_and_the_aux_adamw_the_rest():
    t = built(SGD)
    opt, hidden = t.optimizer, t.split.params("hidden")
    assert isinstance(opt, CombinedOptimizer) and repr(opt) == "CombinedOptimizer(SGD, AdamW)"
    sgd, adamw = opt.optimizers
    assert isinstance(sgd, ExternalOptimizer) and type(sgd.inner) is torch.optim.SGD
    assert [p for g in sgd.param_groups for p in g["params"]] == hidden  # the hidden matrices only
    rest = [p for g in ("embedding", "head", "gain_bias") for p in t.split.params(g)]
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in rest}
    p0 = {p: p.detach().clone() for p in t.model.parameters()}
    g1 = gradients(t.model, 0)
    opt.step()
    p1 = {p: p.detach().clone() for p in t.model.parameters()}
    for p in hidden:  # SGD, momentum 0.9: the first buffer is the gradient itself
        assert torch.equal(p1[p], p0[p].add(g1[p], alpha=-0.1))
    for p in rest:  # AdamW's first step: lr * m_hat / (sqrt(v_hat) + eps) = 1e-3 * g / (|g| + 1e-8), no decay
        assert torch.allclose(p0[p] - p1[p], 1e-3 * g1[p] / (g1[p].abs() + 1e-8), rtol=1e-4, atol=1e-10)
    assert max((p0[p] - p1[p]).abs().max().item() for p in rest) == pytest.approx(1e-3, rel=1e-3)
    g2 = gradients(t.model, 1)
    opt.step()
    for p in hidden:  # buffer = 0.9 g1 + g2
        assert torch.equal(p.detach(), p1[p].add(g1[p].mul(0.9).add(g2[p]), alpha=-0.1))


def test_params_all_gives_the_class_every_parameter_and_the_shared_group_takes_them_back():
    t = built({**SGD, "momentum": 0.0, "weight_decay": 0.1, "_params_": "all"})
    opt = t.optimizer
    assert isinstance(opt, ExternalOptimizer) and repr(opt) == "SGD"  # no auxiliary AdamW
    assert [(g["group"], g["weight_decay"]) for g in opt.param_groups] == [
        ("hidden", 0.1), ("embedding", 0.1), ("gain_bias", 0.0)]  # GPT-2 ties its head: no head group
    p0 = {p: p.detach().clone() for p in t.model.parameters()}
    g = gradients(t.model)
    opt.step()
    for group in opt.param_groups:
        for p in group["params"]:  # torch's SGD: g + wd p, then p - lr (g + wd p)
            assert torch.equal(p.detach(), p0[p].add(g[p].add(p0[p], alpha=group["weight_decay"]), alpha=-0.1))
    assert len(built({"_target_": "torch.optim.LBFGS", "_params_": "all"}).optimizer.param_groups) == 1  # no wd
    # protocol v2's shared group: the class keeps the hidden matrices, the shared AdamW (hybrid.lr) the rest
    for params in ("all", "hidden"):
        shared = built({**SGD, "_params_": params}, "hybrid.enabled=true", "hybrid.lr=0.004").optimizer
        assert repr(shared) == "CombinedOptimizer(SGD, AdamW)"
        assert sum(len(g["params"]) for g in shared.optimizers[0].param_groups) == 8  # 2 blocks x 4 matrices
        assert {g["lr"] for g in shared.optimizers[1].param_groups} == {0.004}


def test_an_unknown_argument_is_one_line_through_the_preflight_and_prepare_run(tmp_path):
    conf = REPO / "conf"
    register_configs()
    assert preflight(conf, ["optimizer=schedulefree_adamw", "optimizer.warmup_stepz=3"]) == (
        "optimizer.warmup_stepz: Key 'warmup_stepz' is not in struct (did you mean optimizer.warmup_steps?)")
    assert preflight(conf, ["optimizer=schedulefree_adamw", "optimizer.r=0.5"]) == (
        "optimizer.r: Key 'r' is not in struct (the YAML does not set it; schedulefree.AdamWScheduleFree takes it: "
        "add it with +optimizer.r=VALUE)")
    with pytest.raises(ConfigError) as e:
        prepare_run(composed("optimizer=schedulefree_adamw", "+optimizer.warmup_stepz=3"), tmp_path / "run")
    assert str(e.value) == (
        "optimizer.warmup_stepz: schedulefree.AdamWScheduleFree takes no argument 'warmup_stepz'; did you mean "
        "warmup_steps? (it takes: lr, betas, eps, weight_decay, warmup_steps, r, weight_lr_power, foreach)")
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match=r"^optimizer\.momentun: pytorch_optimizer\.Kron takes no argument "
                                          r"'momentun'; did you mean momentum\? .*_strict_: false passes it"):
        validate(to_typed(composed("optimizer=psgd_kron", "+optimizer.momentun=0.5")))  # checked despite **kwargs
    spec = validate(to_typed(composed("optimizer=schedulefree_adamw", "+optimizer.r=0.5", "optimizer.betas=[0.8,0.9]")))
    assert isinstance(spec, ExternalSpec) and spec.kwargs["r"] == 0.5 and spec.kwargs["betas"] == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"^optimizer\._parms_: not a reserved key .*did you mean _params_\?$"):
        validate(to_typed(composed(optimizer={**SGD, "_parms_": "all"})))


@pytest.mark.parametrize("optimizer, message", [
    ({**SGD, "lr": -1}, "optimizer: torch.optim.SGD refuses these arguments (ValueError: Invalid learning rate: -1)"),
    ("psgd_kron", ("optimizer: pytorch_optimizer.Kron refuses these arguments (NegativeLRError: learning rate "
                   "must be positive. (-1 > 0))")),
    ({"_target_": "torch.optim.LBFGS", "_closure_": False},
     "optimizer._closure_: torch.optim.LBFGS.step requires a closure (use auto or true)"),
    ({**SGD, "lr": math.inf}, "optimizer.lr: must be a finite number (got inf)"),
])
def test_a_value_the_class_refuses_is_one_line_before_any_compute(tmp_path, optimizer, message):
    cfg = (composed(f"optimizer={optimizer}", "optimizer.lr=-1") if isinstance(optimizer, str)
           else composed(optimizer=optimizer))
    with pytest.raises(ConfigError) as e:
        prepare_run(cfg, tmp_path / "run")
    assert str(e.value) == message and not (tmp_path / "run").exists()


def test_schedule_free_evaluates_its_average_and_evaluation_leaves_training_alone(kjv_dir, tmp_path):
    every = prepare_run(composed("optimizer=schedulefree_adamw", "train.max_steps=3", "train.eval_every=1"),
                        tmp_path / "every")
    summary = train(every)
    ends = prepare_run(composed("optimizer=schedulefree_adamw", "train.max_steps=3", "train.eval_every=3",
                                "train.eval_dense_frac=0"), tmp_path / "ends")
    train(ends)
    trained = [r["train_loss"] for r in read_jsonl(tmp_path / "every" / "metrics.jsonl") if "train_loss" in r]
    assert len(trained) == 3 and trained == [r["train_loss"] for r in read_jsonl(tmp_path / "ends" / "metrics.jsonl")
                                             if "train_loss" in r]  # 4 evaluations against 2: the same y
    sf = every.optimizer.optimizers[0].inner
    y = [p.detach().clone() for p in every.model.parameters()]
    at_y = val_loss(every, every.model)
    sf.eval()  # by hand: the parameters become the average x
    x = [p.detach().clone() for p in every.model.parameters()]
    assert val_loss(every, every.model) == summary["final_val_loss"] != at_y
    final = torch.load(tmp_path / "every" / "model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a, b) for a, b in zip(final.values(), every.model.state_dict().values()))  # x saved
    sf.train()  # a round trip through the package's own lerps does not give y back bit for bit: the restore does
    assert not all(torch.equal(a, p) for a, p in zip(y, every.model.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(x, y))


def test_schedule_free_resumes_bit_exactly(kjv_dir, tmp_path):
    args = ("optimizer=schedulefree_adamw", "train.max_steps=4", "train.eval_every=2", "train.ckpt_every=2",
            "train.ckpt_keep_final=true")
    run_dir = tmp_path / "run"
    first = train(prepare_run(composed(*args), run_dir))
    whole, weights = losses(run_dir), torch.load(run_dir / "model_final.pt", weights_only=True)["state_dict"]
    (run_dir / "summary.json").unlink()  # as if killed after step 3: the newest checkpoint is step 2's
    resumed = prepare_run(composed(*args), run_dir)
    assert resumed.resume is not None and resumed.resume[1]["step"] == 2
    second = train(resumed)
    assert losses(run_dir) == whole and second["resumed_from_steps"] == [2]
    assert second["final_val_loss"] == first["final_val_loss"]
    again = torch.load(run_dir / "model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_lbfgs_gets_a_closure_and_its_evaluations_are_recorded(kjv_dir, tmp_path):
    run = prepare_run(composed("train.max_steps=2", "train.eval_every=2",
                               optimizer={"_target_": "torch.optim.LBFGS", "lr": 0.5, "max_iter": 2}), tmp_path / "r")
    forwards = []
    run.model.register_forward_hook(lambda m, i, o: forwards.append(m.training))
    summary = train(run)
    # max_iter=2 (max_eval = 2 * 5 // 4 = 2): the step's own evaluation and one after the first move, per step
    assert summary["closure_evals"] == 4 == run.optimizer.optimizers[0].inner.state_dict()["state"][0]["func_evals"]
    assert forwards.count(True) == 2 * (1 + 2) * run.grad_accum  # 2 steps x (loop + 2 closures) x 2 micro-batches
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["optimizer_external"]["closure"] is True
    assert not summary["diverged"]


def test_a_class_drawing_from_numpy_repeats_under_one_seed(kjv_dir, tmp_path):
    """Kron balances its factors when np.random.random() < balance_prob (numpy's global generator, which the run
    does not otherwise seed): the adapter seeds it from the run's seed, so the repeat matches bit for bit."""
    args = ("optimizer=psgd_kron", "optimizer.balance_prob=0.5", "train.max_steps=4", "train.eval_every=4")
    train(prepare_run(composed(*args), tmp_path / "a"))
    np.random.seed(12345)  # whatever this process drew before
    train(prepare_run(composed(*args), tmp_path / "b"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


@pytest.mark.parametrize("name", list(ZOO))
def test_every_zoo_yaml_trains_through_train_py(kjv_dir, tmp_path, capsys, name):
    target, package = ZOO[name]
    summary = train(prepare_run(composed(f"optimizer={name}", "train.max_steps=3", "train.eval_every=3",
                                         "train.eval_dense_frac=0"), tmp_path / "r"))
    yaml = OmegaConf.load(REPO / "conf" / "optimizer" / f"{name}.yaml")
    ext = summary["optimizer_external"]
    assert (summary["optimizer_target"], ext["class"], ext["package"], ext["params"]) == (target, target, package,
                                                                                           "hidden")
    assert ext["kwargs"]["lr"] == yaml.lr and summary["closure_evals"] == 0
    assert summary["optimizer_class"] == f"CombinedOptimizer({target.rpartition('.')[2]}, AdamW)"
    val = [r["val_loss"] for r in read_jsonl(tmp_path / "r" / "metrics.jsonl") if "val_loss" in r]
    assert not summary["diverged"] and len(val) == 2 and val[1] < val[0]
    assert f"external     {target}(lr={yaml.lr!r}" in capsys.readouterr().out
    assert OmegaConf.load(tmp_path / "r" / "config.yaml").optimizer._target_ == target


def test_a_benchmark_arm_of_the_zoo_validates_and_composes(tmp_path, capsys):
    lr = {"default": 2.5e-3, "low": 2.5e-4, "high": 2.5e-2, "step": 3.1623, "source": "test"}
    wd = {"default": 0.01, "low": 1e-3, "high": 0.1, "step": 3.1623, "source": "test"}
    d = {"name": "t", "experiment": "smoke", "budgets": [4, 8, 12], "hybrid": {"lr": 3.0e-3, "source": "test"},
         "search": {"method": "coordinate", "trials": 3}, "seeds": [1, 2, 3], "launcher": "basic",
         "arms": {"adamw": {"optimizer": "adamw", "space": {"optimizer.lr": {**lr, "default": 1e-3},
                                                            "optimizer.weight_decay": wd}},
                  "sf": {"optimizer": "schedulefree_adamw", "set": {"optimizer._params_": "hidden"},
                         "space": {"optimizer.lr": lr, "optimizer.weight_decay": wd}}}}
    path = tmp_path / "b.yaml"
    path.write_text(OmegaConf.to_yaml(d))
    b = load_bench(str(path))
    run_benchmark(b, tmp_path / "out", dry_run=True)
    assert "  sf             lr=0.0025,weight_decay=0.01" in capsys.readouterr().out
    (tmp_path / "conf" / "trial").mkdir(parents=True)
    run = _tune_run(b, "sf", {"optimizer.lr": 7.906e-3, "optimizer.weight_decay": 0.01}, tie=False)
    (tmp_path / "conf" / "trial" / "x.yaml").write_text(trial_config(b, run, {"lr": 3.0e-3}, tmp_path))
    cfg = to_typed(composed(f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+trial=x"))
    spec = validate(cfg)
    assert (spec.target, spec.kwargs["lr"], spec.kwargs["weight_decay"]) == ("schedulefree.AdamWScheduleFree",
                                                                            7.906e-3, 0.01)
    opt = build_trainable(cfg, spec, torch.device("cpu")).optimizer  # the shared group (hybrid.lr) on the rest
    assert repr(opt) == "CombinedOptimizer(AdamWScheduleFree, AdamW)"
    assert {g["lr"] for g in opt.optimizers[1].param_groups} == {3.0e-3}
    for key, message in [("optimizer.lrr", ("bench.arms.sf.space.optimizer.lrr: optimizer=schedulefree_adamw "
                                            "(schedulefree.AdamWScheduleFree) takes no key 'lrr' (did you mean "
                                            "optimizer.lr?)")),
                         ("optimizer._params_", ("bench.arms.sf.space.optimizer._params_: _params_ is an option of "
                                                 "the arm (set it), not a tuned knob"))]:
        d["arms"]["sf"]["space"] = {key: lr, "optimizer.r": {**lr, "source": "the package's r is a knob too"}}
        path.write_text(OmegaConf.to_yaml(d))
        with pytest.raises(BenchError) as e:
            load_bench(str(path))
        assert str(e.value) == message


def test_perf_lists_every_zoo_yaml():
    names = perf.optimizer_names()
    assert set(ZOO) <= set(names) and names[0] == "adamw"


def test_state_bytes_counts_nested_tensors_once():
    """PSGD-Kron keeps its factors in lists inside a parameter's state: they are state memory too."""
    from harness.lifecycle.records import state_bytes

    shared = torch.zeros(4, dtype=torch.float32)  # 16 bytes, held twice
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    opt.state[opt.param_groups[0]["params"][0]] = {
        "Q": [torch.zeros(3, 3), torch.zeros(5, dtype=torch.bfloat16)], "m": shared, "again": (shared,),
        "step": 7, "nested": {"exprs": "ab,bc->ac", "v": torch.zeros(2, dtype=torch.float64)}}
    assert state_bytes(opt) == 36 + 10 + 16 + 16


@pytest.mark.slow  # ~1-2 min: a whole (tiny) benchmark, tuning, seeds, branches and the report
def test_a_zoo_arm_runs_through_the_benchmark_driver_to_the_report(kjv_dir, tmp_path):
    """scripts/bench.py end to end with Schedule-Free AdamW as an arm beside the AdamW reference: every run
    completes, the report names the arm, its runs record the class."""
    axis = {"low": 1.0e-4, "high": 3.0e-2, "step": 3.1623, "source": "test"}
    space = {"optimizer.lr": {"default": 3.0e-3, **axis}, "optimizer.weight_decay": {"default": 0.01, **axis}}
    decl = {"name": "z", "protocol": 2, "experiment": "smoke", "overrides": ["train.eval_every=4"],
            "budgets": [4, 8, 12], "hybrid": {"source": "test"}, "search": {"method": "coordinate", "trials": 2},
            "reference": "adamw", "muon_variants": [], "tuning_seed": 0, "seeds": [1, 2, 3], "launcher": "basic",
            "jobs": 1, "threads": 1, "logger": "none",
            "arms": {"adamw": {"optimizer": "adamw", "space": space},
                     "sf": {"optimizer": "schedulefree_adamw", "space": space}}}
    path, out = tmp_path / "z.yaml", tmp_path / "bench_z"
    path.write_text(OmegaConf.to_yaml(decl))
    proc = subprocess.run([sys.executable, "scripts/bench.py", str(path), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in (out / "runs").rglob("summary.json")]
    sf = [s for s in summaries if s.get("optimizer_external")]
    assert sf and all(s["optimizer_external"]["class"] == "schedulefree.AdamWScheduleFree" for s in sf)
    assert all(not s["diverged"] and math.isfinite(s["final_val_loss"]) for s in summaries)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) >= {"adamw", "sf"}
    assert "sf" in (out / "report.md").read_text()
