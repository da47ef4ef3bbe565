"""Learning-rate and evaluation schedules as pure functions of the step.

Both are part of what makes runs comparable: the LR multiplier at step s depends only on (s, max_steps,
schedule config), and the evaluation steps depend only on the workload, never on the optimizer or the loss.

    >>> lr_factor(0, 100, ScheduleConfig(name="cosine", warmup_frac=0.1))
    0.1

This module depends on nothing else of the harness (harness/config/schema.py imports ScheduleConfig from here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # constant | cosine | linear | wsd
    warmup_frac: float = 0.0  # fraction of max_steps with linear warmup
    # Absolute warmup length in steps; when set it replaces warmup_frac x max_steps. Cooldown branches
    # (train.branch_from) and their parent must share the warmup, which a fraction of two budgets would not.
    warmup_steps: int | None = None
    min_lr_frac: float = 0.1  # final lr as a fraction of the peak (cosine, linear, wsd)
    decay_frac: float = 0.2  # wsd only: fraction of max_steps spent in the final decay


class EvalPlan(Protocol):
    """What eval_steps reads (harness.config.TrainConfig has these fields)."""

    max_steps: int
    eval_every: int
    eval_dense_every: int
    eval_dense_frac: float


def warmup_steps(max_steps: int, sched: ScheduleConfig) -> int:
    if sched.warmup_steps is not None:
        return sched.warmup_steps
    return round(sched.warmup_frac * max_steps)


def lr_factor(step: int, max_steps: int, sched: ScheduleConfig) -> float:
    """Multiplier of each group's base lr for the update taken at step `step` (0-based, < max_steps).

    warmup: (step + 1) / W for step < W, so the first update is not taken at lr 0; W = schedule.warmup_steps,
            or round(warmup_frac * max_steps) when that is unset.
    After warmup, with p = (step - W) / (max_steps - W) in [0, 1) and m = min_lr_frac:
      constant: 1
      cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2
      linear:   1 - (1 - m) * p
      wsd:      1 until the last decay_frac * max_steps steps (warmup-stable-decay, Hu et al. 2024,
                MiniCPM), then linear from 1 to m over those steps.
    """
    if not 0 <= step < max_steps:
        raise ValueError(f"step {step} outside [0, {max_steps})")
    w = warmup_steps(max_steps, sched)
    if step < w:
        return (step + 1) / w
    m = sched.min_lr_frac
    if sched.name == "constant":
        return 1.0
    if sched.name == "wsd":
        decay = max(1, round(sched.decay_frac * max_steps))
        start = max_steps - decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - m) * (step - start) / decay
    p = (step - w) / (max_steps - w)
    if sched.name == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    if sched.name == "linear":
        return 1.0 - (1.0 - m) * p
    raise ValueError(f"schedule.name: unknown schedule {sched.name!r} (choose from {', '.join(SCHEDULES)})")


def eval_steps(train: EvalPlan) -> list[int]:
    """Steps (number of updates done) after which the validation loss is measured.

    Step 0 (the initial model), every `eval_every` steps, every `eval_dense_every` steps within the last
    `eval_dense_frac` of the budget (steps-to-target is read at evaluation points, so they are denser where
    the target is usually crossed), and always the final step.
    """
    n = train.max_steps
    steps = set(range(0, n + 1, train.eval_every))
    dense_from = n - round(train.eval_dense_frac * n)
    steps.update(s for s in range(dense_from, n + 1) if (s - dense_from) % train.eval_dense_every == 0)
    steps.add(n)
    return sorted(steps)
