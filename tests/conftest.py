"""Shared fixtures: the embedded corpus prepared once (cached in data/cache/kjv, as `make data` does), a
helper that runs train.py as a user would, and the rounding-error estimates the numerical tolerances use."""

import json
import math
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


def rounding_tol(terms: float, dtype) -> float:
    """sqrt(terms) * eps(dtype): the typical error, relative to the scale of the result, that floating-point
    rounding leaves in sums (or chains of sums) of `terms` products in all. Each product and addition rounds
    by <= eps/2 relative; over K terms the worst case is ~K eps * sum|terms|, but independent roundings add
    like a random walk, ~sqrt(K) eps, which is what two implementations of the same maths (other summation
    orders, kernels, blockings) differ by. For a difference between code paths, never for a bug: a wrong
    formula, a dropped term or a misrouted tensor moves results by far more than this."""
    import torch

    return math.sqrt(terms) * torch.finfo(dtype).eps


def model_path_terms(cfg, seq_len: int) -> int:
    """The reduction lengths one token's gradient passes through in series from the last block to the first
    (the backward; the forward's series is shorter), per block: the MLP's output and input projections (d_model,
    and 2 d_ff: Llama's gate and up sum over both), the two norms (d_model each), the attention output and the
    q, k, v projections (4 d_model), the scores (head_dim) and the softmax and mixing (2 seq_len)."""
    return cfg.n_layer * (7 * cfg.d_model + 2 * cfg.ffn_dim + cfg.head_dim + 2 * seq_len)


def logits_tol(model, seq_len: int, logits) -> float:
    """Largest |difference| allowed between a model's logits and another implementation's of the same maths
    (Hugging Face's, a merged model's: other kernels, other summation orders): the rounding of the reductions
    through the blocks and the head (d_model), relative to the logits' largest entry, in their dtype."""
    terms = model_path_terms(model.cfg, seq_len) + model.cfg.d_model
    return rounding_tol(terms, logits.dtype) * logits.abs().max().item()


# The synthetic benchmark of the report tests (tests/synthetic_bench.py), as fixtures for tests/test_analysis.py
# and tests/test_report.py; built only when a test asks for them.
from synthetic_bench import an, built, main_bench, runs  # noqa: F401
