"""Cooldown branches (train.branch_from / train.branch_step, harness/lifecycle/branch.py; protocol v2): a branch of a long
WSD run, resumed at s = B - round(decay_frac * B) from the parent's pinned checkpoint (train.ckpt_steps) and run
to max_steps = B, is bit for bit the fresh run of budget B; every branch it cannot be is refused in one line before
any compute, the parent untouched. Also schedule.warmup_steps and the schedule module's independence."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, read_jsonl
from hydra import compose, initialize_config_dir

from harness.config.schema import ConfigError, register_configs, to_typed
from harness.config.validate import validate
from harness.lifecycle.checkpoint import checkpoints
from harness.loop.schedule import SCHEDULES, ScheduleConfig, lr_factor

register_configs()
PARENT_STEPS, B, DECAY = 40, 20, 0.2
S = B - round(DECAY * B)  # 16: the branch step of budget B
WSD = ["schedule=wsd", f"schedule.decay_frac={DECAY}", "schedule.warmup_steps=2"]


def cmd(run_dir, *overrides):
    return [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run_dir}", "logger=none",
            "train.threads=1", *overrides]


def launch(run_dir, *overrides):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd(run_dir, *overrides), cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def branch_args(parent, max_steps=B, step=S, *extra):
    return [*WSD, f"train.max_steps={max_steps}", f"train.branch_from={parent}", f"train.branch_step={step}", *extra]


@pytest.fixture(scope="module")
def runs(kjv_dir, tmp_path_factory):
    """The long WSD parent (pinned checkpoint at S; periodic ones rotated down to 1 beside it), the fresh run of
    budget B, and a short cosine parent, side by side (2 cores)."""
    root = tmp_path_factory.mktemp("branch")
    dirs = {"parent": root / "parent", "fresh": root / "fresh", "cosine": root / "cosine"}
    procs = {
        "parent": launch(dirs["parent"], *WSD, f"train.max_steps={PARENT_STEPS}", f"train.ckpt_steps=[{S}]",
                         "train.ckpt_every=5", "train.ckpt_keep=1"),
        "fresh": launch(dirs["fresh"], *WSD, f"train.max_steps={B}"),
        "cosine": launch(dirs["cosine"], "schedule=cosine", "schedule.warmup_steps=2", "train.max_steps=8",
                         "train.ckpt_steps=[4]"),
    }
    for name, proc in procs.items():
        rc, _, err = finish(proc)
        assert rc == 0, f"{name}: {err[-3000:]}"
    return dirs


def test_branch_is_bit_identical_to_the_fresh_run(runs, tmp_path):
    parent, fresh, branch = runs["parent"], runs["fresh"], tmp_path / "b20"
    # the pinned checkpoint survived rotation (ckpt_keep=1 with checkpoints every 5 steps) and completion
    assert [p.name for p in checkpoints(parent)] == [f"step_{S:08d}.pt"]
    before = digest(parent)
    rc, out, err = finish(launch(branch, *branch_args(parent)))
    assert rc == 0, err[-3000:]
    assert f"branched from {parent}/checkpoints/step_{S:08d}.pt at step {S}" in out
    assert digest(parent) == before

    def train_records(d):
        return [{k: v for k, v in r.items() if k != "train_time_s"} for r in read_jsonl(d / "metrics.jsonl")
                if "train_loss" in r]

    got, want = train_records(branch), train_records(fresh)
    assert [r["step"] for r in got] == list(range(1, B + 1))
    assert got == want  # exact: every train loss, grad norm and lr of all B steps
    sb, sf = (json.loads((d / "summary.json").read_text()) for d in (branch, fresh))
    assert sb["final_val_loss"] == sf["final_val_loss"]  # ==, bit for bit
    late = [(r["step"], r["val_loss"]) for r in read_jsonl(fresh / "metrics.jsonl") if "val_loss" in r and r["step"] > S]
    assert [(r["step"], r["val_loss"]) for r in read_jsonl(branch / "metrics.jsonl")
            if "val_loss" in r and r["step"] > S] == late
    final_b = torch.load(branch / "model_final.pt", weights_only=True)["state_dict"]
    final_f = torch.load(fresh / "model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final_b[k], final_f[k]) for k in final_f)

    # the record: where it came from, the workload of budget B, the parent's records up to S first
    assert sb["branch"] == {"from": str(parent.resolve()), "step": S, "parent_max_steps": PARENT_STEPS,
                            "parent_workload_hash": json.loads((parent / "summary.json").read_text())["workload_hash"]}
    assert sf["branch"] is None and sb["workload_hash"] == sf["workload_hash"] and sb["resumed_from_steps"] == []
    assert json.loads((branch / "env.json").read_text())["branch"] == sb["branch"]
    config = yaml.safe_load((branch / "config.yaml").read_text())["train"]
    assert (config["branch_from"], config["branch_step"], config["max_steps"]) == (str(parent), S, B)
    lines_p = (parent / "metrics.jsonl").read_text().splitlines()
    head = [line for line in lines_p if json.loads(line)["step"] <= S]
    assert (branch / "metrics.jsonl").read_text().splitlines()[:len(head)] == head  # verbatim, clocks included
    # the clock runs on from the parent's at S (its time up to S is part of the branch's)
    times = [r["train_time_s"] for r in read_jsonl(branch / "metrics.jsonl") if "train_loss" in r]
    parent_at_s = next(r["train_time_s"] for r in read_jsonl(parent / "metrics.jsonl") if r["step"] == S)
    assert times == sorted(times) and times[S - 1] == parent_at_s and sb["train_time_s"] > parent_at_s
    assert not (branch / "checkpoints").exists()  # its own (none pinned) are removed as usual


def test_refused_branches(runs, tmp_path):
    """Each refusal: one line naming the problem, before the banner (no compute), the parent byte for byte as
    it was and no branch directory left behind. Launched side by side."""
    parent, cosine = runs["parent"], runs["cosine"]
    missing = tmp_path / "nope"
    no_step = (f"step_00000012.pt: the parent run has no checkpoint at train.branch_step=12 (it has: step_{S:08d}.pt);"
               " launch the parent with train.ckpt_steps=[12]")
    disagree = ("train.branch_step: the lr schedules of the parent (train.max_steps=8) and of this branch "
                "(train.max_steps=6) disagree at step 3")
    cases = {
        "missing step": (branch_args(parent, B, 12), no_step),
        "missing parent": (branch_args(missing), f"train.branch_from: {missing} is not a run directory"),
        "differing key": (branch_args(parent, B, S, "optimizer.lr=0.01"),
                          "the parent run's config differs from this branch's: optimizer.lr: 0.001 -> 0.01;"),
        "cosine parent": (["schedule=cosine", "schedule.warmup_steps=2", "train.max_steps=6",
                           f"train.branch_from={cosine}", "train.branch_step=4"], disagree),
        "step at max_steps": (branch_args(parent, B, B), f"train.branch_step: must be in (0, train.max_steps={B}) (got {B})"),
    }
    before = {d: digest(d) for d in (parent, cosine)}
    procs = {name: launch(tmp_path / name.replace(" ", "_"), *args) for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        rc, out, err = finish(proc)
        assert rc == 2, f"{name}: {rc} {err[-2000:]}"
        lines = [x for x in err.splitlines() if x.startswith("error: ")]
        assert len(lines) == 1 and cases[name][1] in lines[0], f"{name}: {err[-2000:]}"
        assert "Traceback" not in err and "run dir" not in out, name
        assert not (tmp_path / name.replace(" ", "_")).exists(), name
    assert {d: digest(d) for d in (parent, cosine)} == before


# ---- in-process: schedule.warmup_steps, the new keys' validation, the module boundary ------------------------

def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_typed(compose(config_name="config", overrides=["name=test", *overrides]))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("n, frac", [(10, 0.3), (40, 0.05), (7, 0.0), (100, 0.1)])
def test_warmup_steps_equals_the_fraction_form(name, n, frac):
    w = round(frac * n)
    by_frac = [lr_factor(s, n, ScheduleConfig(name=name, warmup_frac=frac)) for s in range(n)]
    by_steps = [lr_factor(s, n, ScheduleConfig(name=name, warmup_frac=0.5, warmup_steps=w)) for s in range(n)]
    assert by_steps == by_frac  # exact; warmup_frac is ignored once warmup_steps is set


def test_warmup_steps_is_shared_across_budgets():
    sched = ScheduleConfig(name="wsd", warmup_steps=2, decay_frac=DECAY, min_lr_frac=0.0)
    assert [lr_factor(s, PARENT_STEPS, sched) for s in range(S)] == [lr_factor(s, B, sched) for s in range(S)]
    assert lr_factor(0, B, sched) == 0.5 and lr_factor(S, B, sched) == 1.0 and lr_factor(S, PARENT_STEPS, sched) == 1.0
    assert lr_factor(S + 1, B, sched) == 0.75  # the branch decays over its own last 4 steps
    frac = ScheduleConfig(name="wsd", warmup_frac=0.1, decay_frac=DECAY)  # 4 steps of 40 vs 2 of 20: not shared
    assert lr_factor(2, PARENT_STEPS, frac) != lr_factor(2, B, frac)


@pytest.mark.parametrize("override, message", [
    ("schedule.warmup_steps=-1", "schedule.warmup_steps: must be in [0, train.max_steps=12) (got -1)"),
    ("schedule.warmup_steps=12", "schedule.warmup_steps: must be in [0, train.max_steps=12) (got 12)"),
    ("train.ckpt_steps=[4,12]", "train.ckpt_steps: 12 is not in (0, train.max_steps=12)"),
    ("train.ckpt_steps=[0]", "train.ckpt_steps: 0 is not in (0, train.max_steps=12)"),
    ("train.branch_step=4", "train.branch_step: 4 without train.branch_from"),
    ("train.branch_from=x", "train.branch_step: must be in (0, train.max_steps=12) (got 0)"),
])
def test_new_keys_are_validated(override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("experiment=smoke", override))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_new_keys_validate_and_warmup_steps_defaults_to_unset():
    cfg = compose_cfg("experiment=smoke", "schedule=wsd", "schedule.warmup_steps=0", "train.ckpt_steps=[3,9]",
                      "train.branch_from=somewhere", "train.branch_step=9")
    validate(cfg)
    assert cfg.train.ckpt_steps == [3, 9] and cfg.schedule.warmup_steps == 0
    assert compose_cfg().schedule.warmup_steps is None and compose_cfg().train.branch_from is None


def test_ckpt_steps_survive_rotation_and_completion(tmp_path):
    from harness.lifecycle import checkpoint

    for step in (2, 4, 5, 6, 8):
        checkpoint.save(tmp_path, step, {"x": torch.zeros(1)}, keep=1, pinned=[5, 4])
    assert [checkpoint.step_of(p) for p in checkpoints(tmp_path)] == [4, 5, 8]
    checkpoint.remove_all(tmp_path, pinned=[5, 4])
    assert [checkpoint.step_of(p) for p in checkpoints(tmp_path)] == [4, 5]
    checkpoint.remove_all(tmp_path)
    assert not (tmp_path / checkpoint.DIR).exists()
    assert Path(checkpoint.path_of(tmp_path, 7)).name == "step_00000007.pt"
