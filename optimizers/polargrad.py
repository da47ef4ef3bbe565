"""PolarGrad (Lau, Long & Su, "PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying
Preconditioning Perspective", arXiv:2505.21799) on the hidden matrices, AdamW on the rest.

Muon steps along polar(M) with a length set by lr and the shape; PolarGrad scales that step by the nuclear
norm ||M||_* = <M, polar(M)> (the dual norm of the spectral norm: steepest descent without normalisation),
with no shape factor and no Nesterov (reference: timlautk/polargrad polar_grad.py; docs/optimizers.md 2.3):

    momentum-first (default):  M <- beta M + (1-beta) G;  U = polar(M);  W <- (1-lr wd) W - lr <M,U> U
    polar-first:               U = polar(G);  nu = <G,U>;  M <- beta M + (1-beta) U;  W <- (1-lr wd) W - lr nu M

The step length is proportional to ||M||_*, which depends on the gradient's scale, the matrix sizes and the
training phase, so no published lr transfers (the reference's scripts span 1e-8 to 50; docs/optimizers.md 2.6).
The harness therefore states its lr by an a-priori rule (lr_scale="muon_at_init", the spec's default): lr is
given on Muon's scale, and on the first step the optimizer fixes the calibration c so that PolarGrad's
first update at lr has, over all hidden matrices together, the Frobenius norm of Muon's first update at that
lr (with Muon's default Keller scale and an exact polar factor: lr sqrt(max(1, m/n)) sqrt(min(m, n)) per
matrix):

    c = sqrt(sum_b max(1, m_b/n_b) min(m_b, n_b)) / sqrt(sum_b |<M_b, U_b> U_b|_F^2)     (first step)

and trains with the reference's update at the raw lr c * lr from then on (c is kept in the param group, so
it survives a checkpoint); decay uses the raw lr too, as the reference's W <- (1 - lr wd) W. At lr = 0.02
(Muon's default) PolarGrad thus starts with Muon's default step size; the benchmark searches a wide log range
around it. lr_scale="raw" is the reference's own lr (c = 1).

    python train.py experiment=bench_tiny optimizer=polargrad optimizer.lr=0.02 optimizer.backend=ns
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from optimizers.adamw import AdamWSpec
from optimizers.groups import (
    QKV_MODES,
    ParamSplit,
    check_row_blocks,
    join_rows,
    matrices_with_grad,
    matrix_group,
    require_matrices,
    row_slices,
    split_rows,
)
from optimizers.hparams import Spec, SpecOptimizer, knob
from optimizers.hybrid import CombinedOptimizer, aux_adamw, with_aux_adamw
from optimizers.ortho import METHODS, compute_dtype, dtype_problem, orthogonalize_many
from optimizers.sharded import apply_update_, unshard

PolarMany = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
LR_SCALES = ("muon_at_init", "raw")


def polargrad_updates(grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *, momentum: float,
                      polar_first: bool, polar: PolarMany) -> list[torch.Tensor]:
    """The PolarGradM step directions (W moves by -lr times each); updates the momentum buffers in place.

    `polar` maps a list of matrices to their polar factors (one batched call per shape). The nuclear norm
    is <X, polar(X)> = tr(H) for X = U H (reference code: sum(X * U)), so no SVD is needed; with an inexact
    polar factor (NS, Polar Express in bf16) it is only approximate (docs/optimizers.md 2.6).
    """
    if polar_first:
        out = []
        for g, u, buf in zip(grads, polar(grads), bufs):
            nu = (g * u).sum()  # ||G||_* of the current gradient scales the averaged polar factors
            buf.lerp_(u, 1 - momentum)
            out.append(buf * nu)
        return out
    for g, buf in zip(grads, bufs):
        buf.lerp_(g, 1 - momentum)
    return [u * (buf * u).sum() for buf, u in zip(bufs, polar(bufs))]


class PolarGrad(SpecOptimizer):
    """PolarGradM over 2-D matrices, with a PolarGradSpec's hyperparameters:
    W <- (1 - lr wd) W - lr * extra_scale * ||M||_* polar(M), lr the raw lr c * spec lr.

    `ns_steps`: iterations of the back-end (NS / Polar Express steps, QDWH's maximum; None = the back-end's
    default, optimizers/ortho.py: orthogonalize); `dtype`: the NS / Polar Express dtype (QDWH and SVD always
    run in fp32). Each group keeps the calibration c as "lr_calibration": 1 under lr_scale=raw, set by the
    first step under muon_at_init.
    """

    def __init__(self, params, spec: PolarGradSpec):
        super().__init__(params, spec, lr_calibration=1.0 if spec.lr_scale == "raw" else None)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        require_matrices(type(self).__name__, self.param_groups[-1]["params"])
        check_row_blocks(self.param_groups[-1])

    def update(self) -> None:
        for group in self.param_groups:
            params = matrices_with_grad(group)
            if not params:
                continue
            grads, bufs = [unshard(p.grad) for p, _ in params], []  # whole matrices, also for sharded ones
            for (p, _), g in zip(params, grads):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(g)
                bufs.append(self.state[p]["momentum_buffer"])
            dtype = compute_dtype(params[0][0].device, group["dtype"])

            def polar(xs, group=group, dtype=dtype):
                return orthogonalize_many(xs, group["backend"], group["ns_steps"], dtype)

            # Each matrix of a fused parameter (Q, K, V) is its own matrix: its own polar factor and nuclear
            # norm. The momentum buffer's row slices are views, so the EMA updates the whole buffer in place.
            pieces = [row_slices(rows, g.size(0)) for (_, rows), g in zip(params, grads)]
            matrices = split_rows(grads, pieces)
            updates = iter(polargrad_updates(matrices, split_rows(bufs, pieces), momentum=group["momentum"],
                                             polar_first=group["polar_first"], polar=polar))
            full_updates = [join_rows([next(updates) for _ in sl]) for sl in pieces]
            if group["lr_calibration"] is None:  # the first step under lr_scale=muon_at_init (module docstring)
                group["lr_calibration"] = muon_match_calibration([g.shape for g in matrices], full_updates)
            lr = group["lr"] * group["lr_calibration"]  # the reference's (raw) lr
            for (p, _), update in zip(params, full_updates):  # decoupled decay, without extra_scale
                apply_update_(p, update, 1 - lr * group["weight_decay"], -lr * group["extra_scale"])


def muon_match_calibration(shapes: Sequence[torch.Size], updates: Sequence[torch.Tensor]) -> float:
    """c such that c * updates has, over all matrices together, the Frobenius norm of Muon's update with the
    Keller scale and an exact polar factor, sqrt(sum max(1, m/n) min(m, n)) (per unit lr; `shapes`: the
    matrices', `updates`: PolarGrad's per unit lr, <M, U> U, one per parameter)."""
    muon = sum(max(1.0, m / n) * min(m, n) for m, n in shapes)
    polargrad = sum(float(u.double().square().sum()) for u in updates)
    if not polargrad > 0 or not math.isfinite(polargrad):
        raise ValueError(f"PolarGrad lr_scale=muon_at_init: the first update has squared norm {polargrad}; "
                         "there is no step size to match (zero or non-finite gradients)")
    return math.sqrt(muon / polargrad)


@dataclass
class PolarGradSpec(Spec):
    supports_fsdp: ClassVar[bool] = True  # runs on FSDP-sharded parameters (train.parallel=fsdp)
    lr: float = knob(0.02, gt=0)  # peak lr, on Muon's scale under lr_scale=muon_at_init (module docstring)
    # muon_at_init (the harness's a-priori rule) | raw (the reference's lr)
    lr_scale: str = knob("muon_at_init", choices=LR_SCALES)
    momentum: float = knob(0.95, ge=0, lt=1)  # EMA beta: M <- beta M + (1 - beta) X
    polar_first: bool = knob(False)  # True: average polar(G), scaled by the current ||G||_*
    weight_decay: float = knob(0.0, ge=0)  # decoupled: W <- W (1 - lr * weight_decay); reference default 0
    # the authors' recipe: k QDWH steps + NS polish | qdwh | ns | polar_express | svd
    backend: str = knob("qdwh_ns", choices=METHODS)
    # back-end iterations (qdwh_ns: the k QDWH steps); None = the back-end's default
    ns_steps: int | None = knob(2, ge=1, nullable=True)
    dtype: str = knob("auto", check=dtype_problem)  # NS / Polar Express dtype: auto | fp32 | bf16 | fp64
    extra_scale: float = knob(1.0, gt=0)  # multiplies the step, not the decay (NVIDIA's extra_scale_factor)
    # GPT-2's fused c_attn: split (Q, K, V apart, as Muon) | fused (one 3d x d matrix)
    qkv: str = knob("split", choices=QKV_MODES, param_group=False)
    aux: AdamWSpec = field(default_factory=aux_adamw)

    def build(self, split: ParamSplit) -> CombinedOptimizer:
        hidden = [matrix_group(split.infos("hidden"), split.layout, self.qkv)]
        return with_aux_adamw(PolarGrad(hidden, self), split, self.aux)
