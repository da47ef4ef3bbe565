"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, NeurIPS 2023) on
every parameter group: the sign of an interpolated momentum, so every coordinate moves by exactly lr.

Per tensor W with gradient g, lr eta, betas (b1, b2), weight decay lambda (docs/optimizers.md 7; the paper's
Program 1 and lucidrains/lion-pytorch 0.2.5, whose operations and their order this follows, so that the two
are bit-identical on identical gradients, tests/test_lion.py):

    c = b1 m + (1 - b1) g                   the update's interpolation (sign(0) = 0, as torch.sign)
    W <- W (1 - eta lambda) - eta sign(c)   decoupled decay, = W - eta (sign(c) + lambda W)
    m <- b2 m + (1 - b2) g                  one state buffer, updated after its use

Being a sign method its update has RMS ~1 per coordinate, larger than Adam's, so the paper advises an lr
3-10x smaller and a weight decay 3-10x larger than AdamW's. The defaults take the 3x end of that rule applied
to AdamW's defaults (1e-3, 0.1): (3e-4, 0.3), lr x wd about unchanged; an a-priori rule, not a value tuned on a
benchmark workload. Like AdamW it runs on all four groups, decaying those in `decay_groups` and never
gains/biases.

    python train.py experiment=bench_tiny optimizer=lion optimizer.lr=3e-4 optimizer.weight_decay=1.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optimizers.groups import ParamSplit, group_names_problem
from optimizers.hparams import Spec, SpecOptimizer, knob


def lion_update(grad: torch.Tensor, exp_avg: torch.Tensor, *, betas: tuple[float, float]) -> torch.Tensor:
    """sign(b1 m + (1 - b1) g): what W moves along, times lr (before weight decay). Then
    m <- b2 m + (1 - b2) g in place; `grad` is left untouched. Both are formed as lion-pytorch 0.2.5 forms them
    (m * b, then add with alpha), not with lerp, whose other rounding leaves m a bit off the reference's and
    so can flip the sign of a c near 0: the same operations make Lion bit-identical to it (tests)."""
    b1, b2 = betas
    direction = exp_avg.mul(b1).add_(grad, alpha=1 - b1).sign_()
    exp_avg.mul_(b2).add_(grad, alpha=1 - b2)
    return direction


class Lion(SpecOptimizer):
    """Lion over any param groups (tensors of any shape), with a LionSpec's hyperparameters; state: one
    "exp_avg" per parameter. p.grad is never modified."""

    def update(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                direction = lion_update(p.grad, state["exp_avg"], betas=group["betas"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(direction, alpha=-group["lr"])


@dataclass
class LionSpec(Spec):
    lr: float = knob(3e-4, gt=0)  # peak lr; AdamW's 1e-3 / 3.3 (paper: 3-10x smaller; module docstring)
    betas: list[float] = knob([0.9, 0.99], pair_in=(0, 1))  # paper's defaults
    weight_decay: float = knob(0.3, ge=0)  # decoupled, W <- W (1 - lr wd); AdamW's 0.1 x 3 (paper: 3-10x)
    decay_groups: list[str] = knob(["hidden", "embedding", "head"], check=group_names_problem,
                                   param_group=False)  # where weight_decay applies (never gains/biases)

    def build(self, split: ParamSplit) -> Lion:
        """Lion over all four groups of the split, weight decay only on `decay_groups`."""
        return Lion(split.decay_param_groups(self.weight_decay, self.decay_groups), self)
