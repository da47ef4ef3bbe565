"""A user's own search outside the protocol: train.py returns the end-of-schedule validation loss, so a Hydra
sweeper can minimize it (hydra/sweeper=optuna, the hydra-optuna-sweeper package; README: Running)."""

import json
import os
import re
import subprocess
import sys

from conftest import REPO


def test_optuna_sweeper_minimizes_the_returned_loss(kjv_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "train.py", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                           "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0", "optimizer=adamw",
                           "optimizer.lr=interval(0.0001,0.01)", "experiment=smoke", "logger=none", "train.max_steps=4",
                           "train.threads=1", f"hydra.sweep.dir={sweep}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(p.read_text())["final_val_loss"] for p in sweep.glob("*/summary.json")]
    assert len(losses) == 2 and len(set(losses)) == 2  # two trials, two learning rates
    best = float(re.search(r"Best value: ([0-9.eE+-]+)", proc.stdout + proc.stderr).group(1))
    assert best == min(losses)  # what the sweeper saw is what the records say
