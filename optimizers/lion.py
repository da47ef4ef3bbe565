"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, NeurIPS 2023) on
every parameter group: the sign of an interpolated momentum, so every coordinate moves by exactly lr.

Per tensor W with gradient g, lr eta, betas (b1, b2), weight decay lambda (optimizers.md 7; the paper's
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

from dataclasses import dataclass, field

import torch

from optimizers.adamw import check_adam_hparams
from optimizers.groups import GROUPS, ParamSplit


def lion_update(grad: torch.Tensor, exp_avg: torch.Tensor, *, betas: tuple[float, float]) -> torch.Tensor:
    """sign(b1 m + (1 - b1) g): what W moves along, times lr (before weight decay). Then
    m <- b2 m + (1 - b2) g in place; `grad` is left untouched. Both are formed as lion-pytorch 0.2.5 forms them
    (m * b, then add with alpha), not with lerp, whose other rounding left m a bit off the reference's and so
    could flip the sign of a c near 0: the same operations make Lion bit-identical to it (tests)."""
    b1, b2 = betas
    direction = exp_avg.mul(b1).add_(grad, alpha=1 - b1).sign_()
    exp_avg.mul_(b2).add_(grad, alpha=1 - b2)
    return direction


def check_hparams(prefix: str, *, lr: float, betas, weight_decay: float) -> None:
    """Raise ValueError("<prefix><field>: ...") for an impossible value (shared by LionSpec and Lion)."""
    check_adam_hparams(prefix, lr=lr, betas=betas, weight_decay=weight_decay)


class Lion(torch.optim.Optimizer):
    """Lion over any param groups (tensors of any shape); state: one "exp_avg" per parameter. p.grad is never
    modified."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        check_hparams("", lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
        return loss


@dataclass
class LionSpec:
    lr: float = 3e-4  # peak lr; AdamW's 1e-3 / 3.3 (paper: 3-10x smaller than AdamW's; see the docstring)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # paper's defaults
    weight_decay: float = 0.3  # decoupled, W <- W (1 - lr wd); AdamW's 0.1 x 3 (paper: 3-10x larger)
    decay_groups: list[str] = field(default_factory=lambda: ["hidden", "embedding", "head"])

    def validate(self, key: str = "optimizer") -> None:
        """Raise ValueError("<key>.<field>: ...") for impossible values (key = where this spec sits)."""
        check_hparams(f"{key}.", lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        unknown = set(self.decay_groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"{key}.decay_groups: unknown groups {sorted(unknown)} (known: {GROUPS})")

    def build(self, split: ParamSplit) -> Lion:
        """Lion over all four groups of the split, weight decay only on `decay_groups`."""
        groups = [
            {"params": split.params(g), "group": g,
             "weight_decay": self.weight_decay if g in self.decay_groups else 0.0}
            for g in GROUPS if split.groups[g]
        ]
        return Lion(groups, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
