"""PolarGrad (Lau, Long & Su, "PolarGrad: A Class of Matrix-Gradient Optimizers from a Unifying
Preconditioning Perspective", arXiv:2505.21799) on the hidden matrices, AdamW on the rest.

Muon steps along polar(M) with a length set by lr and the shape; PolarGrad scales that step by the nuclear
norm ||M||_* = <M, polar(M)> (the dual norm of the spectral norm: steepest descent without normalisation),
with no shape factor and no Nesterov (reference: timlautk/polargrad polar_grad.py; optimizers.md 2.3):

    momentum-first (default):  M <- beta M + (1-beta) G;  U = polar(M);  W <- (1-lr wd) W - lr <M,U> U
    polar-first:               U = polar(G);  nu = <G,U>;  M <- beta M + (1-beta) U;  W <- (1-lr wd) W - lr nu M

The step length is proportional to ||M||_*, which depends on the gradient's scale, the matrix sizes and the
training phase, so no published lr transfers (the reference's scripts span 1e-8 to 50; optimizers.md 2.6).
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
from optimizers.groups import ParamSplit, check_row_blocks, matrix_group, require_matrices, row_slices
from optimizers.hybrid import Hybrid, with_aux_adamw
from optimizers.muon import aux_adamw_default, check_qkv
from optimizers.ortho import DTYPES, METHODS, compute_dtype, orthogonalize_many
from optimizers.sharded import apply_, full

PolarMany = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def polargrad_updates(grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor], *, momentum: float,
                      polar_first: bool, polar: PolarMany) -> list[torch.Tensor]:
    """The PolarGradM step directions (W moves by -lr times each); updates the momentum buffers in place.

    `polar` maps a list of matrices to their polar factors (one batched call per shape). The nuclear norm
    is <X, polar(X)> = tr(H) for X = U H (reference code: sum(X * U)), so no SVD is needed; with an inexact
    polar factor (NS, Polar Express in bf16) it is only approximate (optimizers.md 2.6).
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


class PolarGrad(torch.optim.Optimizer):
    """PolarGradM over 2-D matrices: W <- (1 - lr wd) W - lr * extra_scale * ||M||_* polar(M).

    `ns_steps`: iterations of the back-end (NS / Polar Express steps, QDWH's maximum; None = the back-end's
    default, 5 or 10); `dtype`: the NS / Polar Express dtype (QDWH and SVD always run in fp32).
    """

    supports_fsdp = True  # whole-matrix step on sharded parameters: optimizers/sharded.py

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 polar_first: bool = False, backend: str = "qdwh", ns_steps: int | None = None,
                 dtype: str = "auto", extra_scale: float = 1.0, lr_scale: str = "raw"):
        check_hparams("", lr=lr, momentum=momentum, weight_decay=weight_decay, backend=backend,
                      ns_steps=ns_steps, dtype=dtype, extra_scale=extra_scale, lr_scale=lr_scale)
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "polar_first": polar_first,
                    "backend": backend, "ns_steps": ns_steps, "dtype": dtype, "extra_scale": extra_scale,
                    "lr_scale": lr_scale, "lr_calibration": 1.0 if lr_scale == "raw" else None}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        require_matrices("PolarGrad", self.param_groups[-1]["params"])
        check_row_blocks(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            blocks = group.get("row_blocks") or [None] * len(group["params"])
            params = [(p, rows) for p, rows in zip(group["params"], blocks) if p.grad is not None]
            if not params:
                continue
            grads, bufs = [full(p.grad) for p, _ in params], []  # whole matrices, also for sharded parameters
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
            updates = iter(polargrad_updates([g[r] for g, sl in zip(grads, pieces) for r in sl],
                                             [b[r] for b, sl in zip(bufs, pieces) for r in sl],
                                             momentum=group["momentum"], polar_first=group["polar_first"],
                                             polar=polar))
            full_updates = []
            for sl in pieces:
                parts = [next(updates) for _ in sl]
                full_updates.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            if group["lr_calibration"] is None:  # the first step under lr_scale=muon_at_init (module docstring)
                group["lr_calibration"] = muon_match_calibration(
                    [g[r].shape for g, sl in zip(grads, pieces) for r in sl], full_updates)
            lr = group["lr"] * group["lr_calibration"]  # the reference's (raw) lr
            for (p, _), update in zip(params, full_updates):  # decoupled decay, without extra_scale
                apply_(p, update, 1 - lr * group["weight_decay"], -lr * group["extra_scale"])
        return loss


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


LR_SCALES = ("muon_at_init", "raw")


def check_hparams(prefix: str, *, lr: float, momentum: float, weight_decay: float, backend: str,
                  ns_steps: int | None, dtype: str, extra_scale: float, lr_scale: str) -> None:
    """Raise ValueError("<prefix><field>: ...") for an impossible value (shared by the spec and the class)."""
    if not lr > 0:
        raise ValueError(f"{prefix}lr: must be > 0 (got {lr})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}momentum: must be in [0, 1) (got {momentum})")
    if weight_decay < 0:
        raise ValueError(f"{prefix}weight_decay: must be >= 0 (got {weight_decay})")
    if backend not in METHODS:
        raise ValueError(f"{prefix}backend: {backend!r} is not one of {', '.join(METHODS)}")
    if ns_steps is not None and ns_steps < 1:
        raise ValueError(f"{prefix}ns_steps: must be >= 1 or null (got {ns_steps})")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"{prefix}dtype: {dtype!r} is not auto, {', '.join(DTYPES)}")
    if not extra_scale > 0:
        raise ValueError(f"{prefix}extra_scale: must be > 0 (got {extra_scale})")
    if lr_scale not in LR_SCALES:
        raise ValueError(f"{prefix}lr_scale: {lr_scale!r} is not one of {', '.join(LR_SCALES)}")


@dataclass
class PolarGradSpec:
    supports_fsdp: ClassVar[bool] = True  # runs on FSDP-sharded parameters (train.parallel=fsdp)
    lr: float = 0.02  # peak lr, on Muon's scale under lr_scale=muon_at_init (module docstring)
    lr_scale: str = "muon_at_init"  # muon_at_init (the harness's a-priori rule) | raw (the reference's lr)
    momentum: float = 0.95  # EMA beta: M <- beta M + (1 - beta) X
    polar_first: bool = False  # True: average polar(G), scaled by the current ||G||_*
    weight_decay: float = 0.0  # decoupled: W <- W (1 - lr * weight_decay); reference default 0
    backend: str = "qdwh_ns"  # the authors' recipe: k QDWH steps + NS polish | qdwh | ns | polar_express | svd
    ns_steps: int | None = 2  # back-end iterations (qdwh_ns: the k QDWH steps); None = the back-end's default
    dtype: str = "auto"  # NS / Polar Express dtype: auto | fp32 | bf16 | fp64 (QDWH, SVD: fp32)
    extra_scale: float = 1.0  # multiplies the step, not the decay (NVIDIA's extra_scale_factor)
    qkv: str = "split"  # GPT-2's fused c_attn: split (Q, K, V apart, as Muon) | fused (one 3d x d matrix)
    aux: AdamWSpec = field(default_factory=aux_adamw_default)

    def validate(self, key: str = "optimizer") -> None:
        """Raise ValueError("<key>.<field>: ...") for impossible values, the auxiliary AdamW's included."""
        check_hparams(f"{key}.", lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                      backend=self.backend, ns_steps=self.ns_steps, dtype=self.dtype,
                      extra_scale=self.extra_scale, lr_scale=self.lr_scale)
        check_qkv(f"{key}.", self.qkv)
        self.aux.validate(f"{key}.aux")

    def build(self, split: ParamSplit) -> Hybrid:
        hidden = [matrix_group(split.infos("hidden"), split.layout, self.qkv)]
        opt = PolarGrad(hidden, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                        polar_first=self.polar_first, backend=self.backend, ns_steps=self.ns_steps,
                        dtype=self.dtype, extra_scale=self.extra_scale, lr_scale=self.lr_scale)
        return with_aux_adamw(opt, split, self.aux)
