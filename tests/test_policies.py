"""What a launch does with what it finds or meets (train.on_complete, train.on_broken, train.on_crash;
harness/lifecycle/rundir.py), and the typed result of prepare_run."""

import json
import math

import pytest
from conftest import REPO
from crashing_optimizer import FAIL_AT
from hydra import compose, initialize_config_dir

from harness.config.schema import ConfigError, register_configs, to_typed
from harness.config.validate import validate
from harness.lifecycle.prepare import CompleteRun, PreparedRun, prepare_run
from harness.lifecycle.recorder import end_loss
from train import train

FAST = ("optimizer=adamw", "train.max_steps=4", "train.eval_every=2", "train.threads=1")
# tests/ is on sys.path (pytest's rootdir-relative imports), so the spec is importable in this process
CRASHING = ("optimizer=adamw", "optimizer._target_=crashing_optimizer.CrashingAdamWSpec", "train.max_steps=6",
            "train.threads=1", "train.progress=false")


def composed(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3", job_name="test"):
        return compose("config", overrides=["experiment=smoke", "logger=none", "name=test", *overrides])


def test_a_crash_is_raised_by_default_and_recorded_as_failed_in_a_benchmark(kjv_dir, tmp_path):
    raising = prepare_run(composed(*CRASHING), tmp_path / "raise")
    with pytest.raises(RuntimeError, match=f"injected failure at step {FAIL_AT}"):
        train(raising)
    raising.lock.release(remove=True)
    assert not (tmp_path / "raise" / "summary.json").exists()  # no record claims the run finished
    summary = train(prepare_run(composed(*CRASHING, "train.on_crash=record"), tmp_path / "record"))
    assert summary == json.loads((tmp_path / "record" / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_at_step"] == FAIL_AT == summary["steps"]
    assert summary["diverged_reason"] == f"error: RuntimeError: injected failure at step {FAIL_AT}"
    assert end_loss(summary) == math.inf  # what a Hydra sweeper is told about a failed run


def test_prepare_run_gives_a_prepared_run_or_the_complete_record(kjv_dir, tmp_path):
    run_dir = tmp_path / "run"
    fresh = prepare_run(composed(*FAST), run_dir)
    assert isinstance(fresh, PreparedRun) and fresh.resume is None and not fresh.continues
    assert (fresh.grad_accum, fresh.tokens_per_step) == (2, 8 * 64)  # smoke: 8 sequences of 64, micro-batches of 4
    train(fresh)
    before = (run_dir / "summary.json").read_text()
    done = prepare_run(composed(*FAST, "train.on_complete=skip"), run_dir)
    assert isinstance(done, CompleteRun) and done.summary == json.loads(before) and done.run_dir == run_dir
    assert (run_dir / "summary.json").read_text() == before and not (run_dir / ".lock").exists()
    assert end_loss(done.summary) == done.summary["final_val_loss"]


@pytest.mark.parametrize("key, value, message", [
    ("on_complete", "overwrite", "train.on_complete: 'overwrite' is not refuse or skip"),
    ("on_broken", "delete", "train.on_broken: 'delete' is not refuse or move_aside"),
    ("on_crash", "ignore", "train.on_crash: 'ignore' is not raise or record"),
])
def test_a_policy_outside_its_names_is_one_line(key, value, message):
    with pytest.raises(ConfigError) as e:
        validate(to_typed(composed(f"train.{key}={value}")))
    assert str(e.value) == message
