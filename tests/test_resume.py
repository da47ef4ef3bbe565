"""Checkpoint and resume (harness/lifecycle/checkpoint.py): a run killed with SIGKILL and relaunched with the same
command ends with metrics.jsonl bit-identical (CPU) to an uninterrupted run, for every optimizer in
conf/optimizer/ (and the PC layer); damaged, foreign and incompatible checkpoints are refused in one line
with nothing touched; a killed benchmark re-run completes only what is missing."""

import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, read_jsonl

from bench.records import load_runs
from harness.lifecycle.checkpoint import checkpoints, config_changes
from harness.loop.state import LoopState

OPTIMIZERS = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))
# Short intervals so that every optimizer's periodic machinery (Newton-Muon's statistics and K^-1, SOAP's
# eigenbases) runs both before and after the checkpoint the run resumes from.
EXTRA = {"newton_muon": ["optimizer.refresh_every=3"], "soap": ["optimizer.precondition_frequency=3"]}
# Lion (one moment) and NorMuon (Muon + one second-moment vector per row) add no state kinds the other cases
# lack; plain AdamW's state is the AdamW+PC case's and every hybrid's; Adam-mini's per-block v has its own
# round-trip test (test_adam_mini.py); SOAP is an optional arm; PolarGrad's state is Muon's momentum plus the
# lr calibration in its param groups (round trip in test_polargrad.py): all six slow-marked to keep the default
# suite under 15 minutes on the slower CI machines (`make test-all` runs them).
SLOW = {"lion", "normuon", "adamw", "soap", "adam_mini", "polargrad"}
# Newton-Muon's K and input statistics (its state beyond Muon's) round-trip in-process in test_newton_muon.py;
# its SIGKILL case (~15 s) is slow-marked since the external-optimizer and FSDP-checkpoint tests joined the suite.
SLOW |= {"newton_muon"}
# The zoo's YAMLs (optimizers/external.py: a package's class, unmodified): the adapter's state is the class's own
# state dict plus a closure count; Schedule-Free's in-process bit-exact resume is in test_external_optimizers.py.
SLOW |= {"schedulefree_adamw", "psgd_kron", "shampoo"}
# pytorch-optimizer's Kron starts its preconditioner at the identity: SGD-sized first steps, so in 12 steps it need
# only get below its step-0 loss (it reaches ~7.89, short of the others' bar ln 4096 - 0.5 = 7.82)
# Lion's a-priori lr (3e-4, the paper's rule from AdamW's 1e-3) makes sign steps of 3e-4: 7.825 after 12 steps
# (2026-12-01), short of the bar by 0.008, well below its step-0 loss (8.32)
SLOW_START = {"psgd_kron", "lion"}
BASE = [(o, ["model=llama_tiny", *EXTRA.get(o, [])]) for o in OPTIMIZERS] + [
    ("adamw", ["model=gpt2_tiny", "model.pc_level=2"])]  # PC layer: power-iteration vectors in the checkpoint
# AdamW+PC (the PC layers' u, v buffers: in the model's state_dict, tests/test_pc_layer.py) slow-marked too.
CASES = [pytest.param(o, x, id=f"{o}{'+pc' if 'model.pc_level=2' in x else ''}", marks=[pytest.mark.slow] if o in SLOW
                      or "model.pc_level=2" in x else [])
         for o, x in BASE]
KILL_AT, CKPT_EVERY = 7, 3  # killed after step 7; the newest checkpoint is step 6's (steps 7.. are redone)


def train_cmd(run_dir, *overrides):
    return [sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run_dir}", "logger=none",
            f"train.ckpt_every={CKPT_EVERY}", *overrides]


def env(**extra):
    return {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **extra}


def run(cmd, **extra):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env(**extra), timeout=600, check=False)


def losses(run_dir):
    """Every metrics line without the wall-clock field (the only thing allowed to differ)."""
    return [{k: v for k, v in r.items() if k != "train_time_s"} for r in read_jsonl(run_dir / "metrics.jsonl")]


def digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("optimizer, overrides", CASES)
def test_sigkill_and_relaunch_is_bit_identical(kjv_dir, tmp_path, optimizer, overrides):
    args = [f"optimizer={optimizer}", *overrides]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # the uninterrupted run and the one killed after step KILL_AT run side by side (2 cores)
    procs = [subprocess.Popen(train_cmd(ref, *args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True),
             subprocess.Popen(train_cmd(cut, *args), cwd=REPO, env=env(OPTBENCH_KILL_AT_STEP=str(KILL_AT)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    (_, err0), (_, err1) = procs[0].communicate(timeout=600), procs[1].communicate(timeout=600)
    assert procs[0].returncode == 0, err0[-3000:]
    assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
    assert not (cut / "summary.json").exists()
    assert [p.name for p in checkpoints(cut)] == ["step_00000003.pt", "step_00000006.pt"]
    assert max(r["step"] for r in read_jsonl(cut / "metrics.jsonl")) >= KILL_AT - 1  # records beyond the checkpoint

    proc = run(train_cmd(cut, *args))  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    a, b = losses(ref), losses(cut)
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no step missing, none twice
    assert b == a  # bit-identical: exact float equality of every loss, norm and lr
    s, s_ref = (json.loads((d / "summary.json").read_text()) for d in (cut, ref))
    assert s["resumed_from_steps"] == [6] and s_ref["resumed_from_steps"] == []
    assert s["final_val_loss"] == s_ref["final_val_loss"] and s["optimizer_state_bytes"] == s_ref["optimizer_state_bytes"]
    assert s["optimizer_flops_per_step"] == s_ref["optimizer_flops_per_step"]  # counted at step 1, kept
    # the clock is restored, not restarted: it runs on from the checkpoint's across the relaunch (a restart
    # from 0 would make step 7's time smaller than step 6's), and is not counted twice: a sanity bound against
    # the uninterrupted run's time, generous as the two ran side by side on 2 cores and the relaunch alone
    times = [r["train_time_s"] for r in read_jsonl(cut / "metrics.jsonl") if "train_loss" in r]
    assert times == sorted(times) and times[0] > 0
    assert 0 < s["train_time_s"] < 3 * s_ref["train_time_s"]
    # the end-to-end check of each optimizer: it learns and does not diverge
    assert s_ref["optimizer"] == optimizer and not s_ref["diverged"]
    bar = losses(ref)[0]["val_loss"] if optimizer in SLOW_START else math.log(4096) - 0.5
    assert s_ref["final_val_loss"] < bar
    assert not (cut / "checkpoints").exists()  # complete records: checkpoints removed (ckpt_keep_final=false)
    final_ref = torch.load(ref / "model_final.pt", weights_only=True)["state_dict"]
    final_cut = torch.load(cut / "model_final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final_ref[k], final_cut[k]) for k in final_ref)  # PC buffers u, v included


def test_sigkill_at_an_arbitrary_moment(kjv_dir, tmp_path):
    """Killed from outside at whatever it is doing once checkpoints exist (possibly mid-write of one):
    the relaunch still continues bit-identically."""
    args = ["optimizer=muon", "train.max_steps=30", "train.ckpt_every=2"]
    ref = subprocess.Popen(train_cmd(tmp_path / "ref", *args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    cut = subprocess.Popen(train_cmd(tmp_path / "cut", *args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_00000006.pt").exists():
        assert cut.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    time.sleep(0.137)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    assert not (tmp_path / "cut" / "summary.json").exists()
    proc = run(train_cmd(tmp_path / "cut", *args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")


# ---- refused checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_run(kjv_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    proc = run(train_cmd(run_dir, "optimizer=adamw"), OPTBENCH_KILL_AT_STEP=str(KILL_AT))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return run_dir


def _corrupt_newest(run_dir, how):
    newest = checkpoints(run_dir)[-1]
    if how == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    else:
        payload = torch.load(newest, weights_only=True)
        if how == "format":
            payload["format"] = 0
        elif how == "renamed parameter":
            payload["model"]["lm_head_renamed.weight"] = payload["model"].pop(next(iter(payload["model"])))
        torch.save(payload, newest)


@pytest.mark.parametrize("how, overrides, message", [
    ("truncated", [], "step_00000006.pt: unreadable checkpoint, truncated or corrupt"),
    ("format", [], "step_00000006.pt: checkpoint format 0 (written by code"),
    ("renamed parameter", [], "step_00000006.pt: the model's parameters differ from this code's"),
    (None, ["train.max_steps=16"], "step_00000006.pt: checkpoint of another workload"),
    (None, ["optimizer.lr=0.01"], "step_00000006.pt: written with another config: optimizer.lr: 0.001 -> 0.01"),
])
def test_bad_checkpoint_is_refused_and_nothing_changes(killed_run, tmp_path, how, overrides, message):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    if how:
        _corrupt_newest(run_dir, how)
    before = digest(run_dir)
    proc = run(train_cmd(run_dir, "optimizer=adamw", *overrides))
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert message in line and "Traceback" not in proc.stderr
    assert "run dir" not in proc.stdout  # refused before the banner: no compute
    assert digest(run_dir) == before


def test_damaged_checkpoint_in_a_benchmark_is_moved_aside_and_rerun(killed_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run, run_dir)
    _corrupt_newest(run_dir, "truncated")
    proc = run(train_cmd(run_dir, "optimizer=adamw", "train.on_broken=move_aside"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unreadable checkpoint" in proc.stdout and "moved to" in proc.stdout
    (aside,) = tmp_path.glob("run.broken-*")
    assert len(checkpoints(aside)) == 2 and (run_dir / "summary.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_steps"] == []


def test_runtime_keys_may_change_on_resume():
    saved = {"train": {"max_steps": 12, "progress": False, "threads": 0}, "wandb": {"mode": "auto"},
             "optimizer": {"lr": 0.003}}
    now = {"train": {"max_steps": 12, "progress": True, "threads": 1}, "wandb": {"mode": "offline"},
           "optimizer": {"lr": 0.003, "eps": 1e-8}}
    assert config_changes(saved, now) == ["optimizer.eps: '<absent>' -> 1e-08"]
    # where the data lives (its content is in the workload hash), and keys a newer code version adds at their off
    # value (a checkpoint written before `model._target_` existed), are not changes; a set new key is
    saved["data"], saved["model"] = {"dir": "data/cache/kjv"}, {"d_model": 128}
    now["data"], now["model"] = {"dir": "/abs/data/cache/kjv"}, {"d_model": 128, "_target_": None, "options": {}}
    assert config_changes(saved, now) == ["optimizer.eps: '<absent>' -> 1e-08"]
    now["model"]["_target_"] = "mine.MLP"
    assert config_changes(saved, now) == ["model._target_: '<absent>' -> 'mine.MLP'", "optimizer.eps: '<absent>' -> 1e-08"]


# ---- divergence ---------------------------------------------------------------------------------------

def test_divergence_watch():
    cpu = torch.device("cpu")
    state = LoopState(cpu)
    assert state.watch(4.0, 1.5, 3) is None and state.blowup == 6.0  # first loss sets the start
    assert [state.watch(x, 1.5, 3) for x in (7.0, 7.0, 5.0, 7.0, 7.0)] == [None] * 5  # spikes reset
    assert "for 3 consecutive steps (last 9.000)" in state.watch(9.0, 1.5, 3)
    assert LoopState(cpu, blowup=6.0).watch(float("nan"), 1.5, 3) == "non-finite training loss (nan)"
    assert LoopState(cpu, blowup=6.0).watch(float("inf"), 1.5, 3) == "non-finite training loss (inf)"


def test_loop_state_round_trips_and_clocks_pause():
    state = LoopState(torch.device("cpu"), blowup=6.0, over=2, opt_flops=123)
    start = time.perf_counter()
    state.train.resume()
    time.sleep(0.02)
    with state.train.paused():
        inside = time.perf_counter()
        time.sleep(0.2)  # not charged to the training clock
        paused = time.perf_counter() - inside
    state.train.pause()
    total = time.perf_counter() - start
    assert 0.02 <= state.train.seconds <= total - paused  # the running stretches only, whatever the machine
    saved = state.state_dict()
    assert set(saved) == {"train_time", "opt_time", "opt_flops", "blowup", "over", "diag_time"}  # checkpoint keys
    again = LoopState(torch.device("cpu"))
    again.load_state_dict(7, saved)
    assert (again.step, again.state_dict()) == (7, saved)


# ---- a benchmark killed midway ------------------------------------------------------------------------

@pytest.mark.slow  # ~50 s; the pieces it composes stay in the default suite: a SIGKILLed run resumes bit-exactly
# (above), a complete record is skipped and left byte-identical (test_policies.py), a broken one moved aside (below)
def test_killed_benchmark_rerun_completes_only_what_is_missing(kjv_dir, tmp_path):
    axis = {"low": 1.0e-4, "high": 3.0e-2, "step": 3.1623, "source": "test"}
    decl = {"name": "k", "protocol": 2, "experiment": "smoke",
            "overrides": ["train.eval_every=4", "train.ckpt_every=2", "schedule=wsd", "schedule.warmup_steps=1"],
            "budgets": [4, 8, 12], "hybrid": {"source": "test"}, "search": {"method": "coordinate", "trials": 2},
            "reference": "adamw", "muon_variants": [], "tuning_seed": 0, "seeds": [1, 2, 3],
            "launcher": "basic", "jobs": 1, "threads": 1, "logger": "none",
            "arms": {"adamw": {"optimizer": "adamw", "space": {
                "optimizer.lr": {"default": 3.0e-3, **axis}, "optimizer.weight_decay": {"default": 0.01, **axis}}}}}
    path, out = tmp_path / "k.yaml", tmp_path / "bench_k"
    path.write_text(yaml.safe_dump(decl))
    cmd = [sys.executable, "scripts/bench.py", str(path), "--out", str(out), "--no-report"]
    first = out / "runs" / "tune" / "adamw" / "lr=0.003,weight_decay=0.01"
    second = out / "runs" / "tune" / "adamw" / "lr=0.0009487,weight_decay=0.01"
    bench = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (second / "checkpoints" / "step_00000004.pt").exists():
        assert bench.poll() is None and time.monotonic() < deadline, bench.stderr.read()[-2000:]
        time.sleep(0.01)
    bench.kill()  # SIGKILL to the driver alone, mid-run of its second trial
    bench.wait()
    # its multirun dies with it (scripts/bench.py: PR_SET_PDEATHSIG): the run's lock is soon free
    deadline = time.monotonic() + 30
    while True:
        with open(second / ".lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the multirun outlived the killed benchmark driver"
        time.sleep(0.1)
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    stamp = (first / "summary.json").stat().st_mtime_ns

    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tune round 0: 1 runs, 0 complete, 1 to run" in proc.stdout  # the complete trial is not relaunched
    assert "seed: 3 runs, 0 complete, 3 to run" in proc.stdout and "branch: 6 runs, 0 complete, 6 to run" in proc.stdout
    # the partial trial continued from its checkpoint (the runs' output goes to the benchmark's logs/)
    assert f"resumed from {second}/checkpoints/step_0000000" in (out / "logs" / "tune.log").read_text()
    assert (first / "summary.json").stat().st_mtime_ns == stamp  # the finished one neither redone nor lost
    assert not list(out.rglob("*.broken-*"))
    resumed = json.loads((second / "summary.json").read_text())
    assert resumed["resumed_from_steps"] and resumed["resumed_from_steps"][0] >= 4
    steps = [r["step"] for r in read_jsonl(second / "metrics.jsonl") if "train_loss" in r]
    assert steps == list(range(1, 13))
    assert len(load_runs(out, phases=("tune", "seed", "branch"))) == 2 + 3 + 6


def test_a_run_directory_in_use_is_refused(kjv_dir, tmp_path):
    """A second process on a directory that a live run is writing (a killed benchmark's orphaned worker and
    its re-run) is refused before any compute; the live run finishes unaffected and leaves no lock file."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_cmd(run_dir, "train.max_steps=60"), cwd=REPO, env=env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    proc = run(train_cmd(run_dir, "train.max_steps=60"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"run directory {run_dir} is in use by another process" in line
    assert "run dir" not in proc.stdout
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 60
    assert not (run_dir / ".lock").exists()
