"""Shared fixtures: the embedded corpus prepared once (cached in data/cache/kjv, as `make data` does) and a
helper that runs train.py as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def kjv_dir():
    out = REPO / "data" / "cache" / "kjv"
    subprocess.run([sys.executable, "-m", "data.prepare", "kjv", "--out", str(out), "--vocab-size", "4096"],
                   cwd=REPO, check=True, capture_output=True)
    return out


def run_train(run_dir, *overrides, check=True, experiment="smoke"):
    """Run `python train.py experiment=<experiment> ...` in a subprocess as a user would; return the process."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    # W&B is on by default (conf/logger/wandb.yaml); tests that check it turn it back on with wandb.enabled=true
    proc = subprocess.run([sys.executable, "train.py", f"experiment={experiment}", f"hydra.run.dir={run_dir}",
                           "logger=none", *overrides],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
