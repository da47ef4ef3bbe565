"""Cooldown branches (protocol v2): end-of-schedule losses at several budgets from one long WSD run.

A branch (train.branch_from=PARENT_DIR train.branch_step=s, in a fresh run directory) starts from the parent's
checkpoint after s steps (the parent ran with train.ckpt_steps=[s]) exactly as a resume would (model, optimizer,
RNG, loop state and clocks, metrics so far), then trains to its own train.max_steps = B. With schedule=wsd, a fixed
schedule.warmup_steps and s = B - round(schedule.decay_frac * B), the lr of every step < s is the same under the
parent's budget and under B, so the branch is, bit for bit, the run that would have been launched with budget B
(tests/test_branch.py): its workload (and hash) is that run's.

    python train.py schedule=wsd schedule.warmup_steps=2 train.max_steps=40 'train.ckpt_steps=[16]' hydra.run.dir=P
    python train.py schedule=wsd schedule.warmup_steps=2 train.max_steps=20 train.branch_from=P train.branch_step=16 \\
        hydra.run.dir=P_b20

Refused before any compute, in one line: a missing parent directory or checkpoint, an unreadable one, a parent of
another config (anything but the BRANCH_KEYS below; the first differing key is named) or of another workload at
its own budget (e.g. changed data), and lr schedules that disagree before s (e.g. a cosine parent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.config.schema import Config, ConfigError
from harness.lifecycle import checkpoint
from harness.lifecycle.checkpoint import CheckpointError
from harness.loop.schedule import lr_factor

# What a branch may change with respect to its parent: the budget, checkpointing, how it is watched and logged,
# and where it is written (hydra's keys are not in the resolved config; `name` labels the run directory).
BRANCH_KEYS = ("train.max_steps", "train.ckpt_steps", "train.ckpt_every", "train.ckpt_keep", "train.ckpt_keep_final",
               "train.branch_from", "train.branch_step", "train.progress", "wandb", "name",
               "bench.phase", "bench.trial",  # a benchmark's branch is its own phase and trial (bench/plan.py)
               "data.dir", "data.prepare")  # where the data lives; what it holds is in the workload hash


def parent_dir(cfg: Config) -> Path:
    """train.branch_from as an absolute path (a relative one is relative to the launch directory, like
    hydra.run.dir)."""
    return Path(cfg.train.branch_from).expanduser().resolve()


def load_parent(cfg: Config, run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The parent's checkpoint after train.branch_step steps: (file, payload). Only reads the parent."""
    parent, step = parent_dir(cfg), cfg.train.branch_step
    if not parent.is_dir():
        raise ConfigError(f"train.branch_from: {parent} is not a run directory (it does not exist)")
    if parent == Path(run_dir).resolve():
        raise ConfigError(f"train.branch_from: {parent} is this run's own directory; a branch is written to a new "
                          "hydra.run.dir")
    path = checkpoint.path_of(parent, step)
    if not path.is_file():
        have = ", ".join(p.name for p in checkpoint.checkpoints(parent)) or "none"
        raise CheckpointError(f"{path}: the parent run has no checkpoint at train.branch_step={step} (it has: "
                              f"{have}); launch the parent with train.ckpt_steps=[{step}]")
    payload = checkpoint.load(path)
    if payload["step"] != step:
        raise CheckpointError(f"{path}: holds the state after step {payload['step']}, not {step}")
    return path, payload


def check_parent(path: Path, payload: dict[str, Any], cfg: Config, resolved: dict[str, Any],
                 hash_of: Callable[[Config], str]) -> dict[str, Any]:
    """Refuse a parent this run cannot branch from; return the branch's record (summary.json, env.json).
    `hash_of(cfg)` is the workload hash of a config (harness.lifecycle.prepare.workload_of on this run's data)."""
    changes = checkpoint.config_changes(payload["config"], resolved, ignore=BRANCH_KEYS)
    if changes:
        more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
        raise CheckpointError(f"{path}: the parent run's config differs from this branch's: {changes[0]}{more}; a "
                              "branch may change only train.max_steps, the checkpoint, progress and logger settings and "
                              "its benchmark phase/trial tag")
    t, step = cfg.train, cfg.train.branch_step
    parent_max = payload["config"]["train"]["max_steps"]
    parent_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=parent_max))
    if hash_of(parent_cfg) != payload["workload_hash"]:
        raise CheckpointError(f"{path}: checkpoint of another workload ({payload['workload_hash'][:12]}) than this "
                              f"config at the parent's train.max_steps={parent_max} (changed data?); results of "
                              "different workloads are never mixed")
    for s in range(step):  # the schedule config is the parent's (checked above); only the budget differs
        a, b = lr_factor(s, parent_max, cfg.schedule), lr_factor(s, t.max_steps, cfg.schedule)
        if a != b:
            raise ConfigError(f"train.branch_step: the lr schedules of the parent (train.max_steps={parent_max}) and "
                              f"of this branch (train.max_steps={t.max_steps}) disagree at step {s} ({a:.6g} vs "
                              f"{b:.6g}); branch a schedule=wsd run with a fixed schedule.warmup_steps, at "
                              "B - round(schedule.decay_frac * B) before the parent's own decay")
    return {"from": str(path.parent.parent), "step": step, "parent_workload_hash": payload["workload_hash"],
            "parent_max_steps": parent_max}
