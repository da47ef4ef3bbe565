"""Muon (Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"): Nesterov
momentum, then the momentum's polar factor (Newton-Schulz by default) as the update of each hidden matrix;
an auxiliary AdamW takes embeddings, head and gains (optimizers/hybrid.py).

Update per m x n matrix W with gradient G (optimizers.md 1.2), lr eta, momentum beta, weight decay lambda:

    M <- beta M + (1 - beta) G;   U = lerp(G, M, beta)  (Nesterov; U = M without)
    O = orthogonalize(U)          (ns | polar_express | qdwh | svd, optimizers/ortho.py)
    W <- W (1 - eta lambda) - eta s(m, n) O

with the shape scale s (optimizers.md 1.3): "keller" sqrt(max(1, m/n)) (update RMS 1/sqrt(n) = 1/sqrt(fan_in)),
"moonlight" 0.2 sqrt(max(m, n)) (update RMS 0.2, reuses AdamW's lr), "spectral" sqrt(m/n) (Dion / muP).

A parameter holding several matrices (GPT-2's fused [q; k; v], a group's "row_blocks", optimizers/groups.py)
is orthogonalized and scaled block by block, each block with its own shape (qkv=split, the default), as
modded-nanogpt and the Newton-Muon reference do; qkv=fused takes the stacked 3d x d matrix as one. The polar
factor of the stack and the stack of the three polar factors differ by ~50% (relative Frobenius, Gaussian
d = 128), so the choice changes every GPT-2 result of the Muon family.

    python train.py experiment=bench_tiny optimizer=muon optimizer.lr=0.02 optimizer.backend=polar_express
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from optimizers.adamw import AdamWSpec
from optimizers.groups import (
    QKV_MODES,
    ParamSplit,
    check_row_blocks,
    matrix_group,
    require_matrices,
    row_slices,
)
from optimizers.hybrid import Hybrid, with_aux_adamw
from optimizers.ortho import DTYPES, METHODS, compute_dtype, orthogonalize, orthogonalize_many
from optimizers.sharded import apply_, full

SCALES = {
    "keller": lambda m, n: math.sqrt(max(1.0, m / n)),
    "moonlight": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(m / n),
}


def scale_factor(shape: torch.Size | tuple[int, int], scale: str) -> float:
    """The shape-dependent multiplier of the orthogonalized update, by convention name (optimizers.md 1.3)."""
    return SCALES[scale](shape[-2], shape[-1])


def momentum_direction(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool) -> torch.Tensor:
    """EMA momentum buf <- beta buf + (1 - beta) grad (in place), and the direction to orthogonalize:
    lerp(grad, buf, beta) with Nesterov, else buf. `grad` is left untouched (Keller's code overwrites p.grad)."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


def muon_update(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float = 0.95, nesterov: bool = True,
                backend: str = "ns", steps: int = 5, dtype: torch.dtype = torch.bfloat16,
                scale: str = "keller") -> torch.Tensor:
    """s(m, n) * orthogonalize(momentum direction): what W moves along, times lr (before weight decay).
    Updates `buf` in place; returns grad's dtype."""
    U = momentum_direction(grad, buf, momentum=momentum, nesterov=nesterov)
    return orthogonalize(U, backend, steps, dtype) * scale_factor(grad.shape, scale)


def check_hparams(prefix: str, *, lr: float, momentum: float, weight_decay: float, ns_steps: int, backend: str,
                  scale: str, dtype: str) -> None:
    """Raise ValueError("<prefix><field>: ...") for an impossible value (shared by MuonSpec and Muon)."""
    if not lr > 0:
        raise ValueError(f"{prefix}lr: must be > 0 (got {lr})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{prefix}momentum: must be in [0, 1) (got {momentum})")
    if weight_decay < 0:
        raise ValueError(f"{prefix}weight_decay: must be >= 0 (got {weight_decay})")
    if ns_steps < 1:
        raise ValueError(f"{prefix}ns_steps: must be >= 1 (got {ns_steps})")
    if backend not in METHODS:
        raise ValueError(f"{prefix}backend: {backend!r} is not one of {', '.join(METHODS)}")
    if scale not in SCALES:
        raise ValueError(f"{prefix}scale: {scale!r} is not one of {', '.join(SCALES)}")
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"{prefix}dtype: {dtype!r} is not auto, {', '.join(DTYPES)}")


class Muon(torch.optim.Optimizer):
    """Muon over param groups of 2-D matrices (like torch.optim.Muon; non-2-D parameters are refused).

    `ns_steps` is the iteration count of the back-end (NS/Polar Express steps, QDWH's maximum; unused by
    svd); `dtype` the NS/Polar Express dtype ("auto": bf16 where measured fast, else fp32). Same-shape
    matrices of a group are orthogonalized in one batched call.

    Subclasses change one stage of `step()` by overriding it; each works on one parameter:

        transform_grad(p, grad, state) -> grad      raw gradient, before momentum (Newton-Muon: G K^-1);
                                                    default: unchanged
        direction(p, grad, state, group) -> U       momentum + Nesterov (what gets orthogonalized)
        shape_update(p, O, state, group, rows)      polar factor of the rows `rows` of p (one matrix of a
                    -> update                       fused parameter, or all of p) -> their update (NorMuon:
                                                    row normalization); default: O * scale_factor(O.shape)

    then `step()` applies W <- W (1 - lr wd) - lr * update. p.grad is never modified. A group's optional
    "row_blocks" (one tuple of row counts per parameter, optimizers/groups.py: matrix_group) cuts a parameter
    into separate matrices for the orthogonalization and shape_update; without it each parameter is one.
    """

    supports_fsdp = True  # whole-matrix step on sharded parameters: optimizers/sharded.py

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, backend: str = "ns", scale: str = "keller",
                 dtype: str = "auto"):
        check_hparams("", lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                      backend=backend, scale=scale, dtype=dtype)
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                    "ns_steps": ns_steps, "backend": backend, "scale": scale, "dtype": dtype}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        require_matrices(type(self).__name__, self.param_groups[-1]["params"])
        check_row_blocks(self.param_groups[-1])

    def transform_grad(self, p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        return grad

    def direction(self, p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)  # grad: whole, also for a sharded p
        return momentum_direction(grad, state["momentum_buffer"], momentum=group["momentum"],
                                  nesterov=group["nesterov"])

    def shape_update(self, p: torch.Tensor, O: torch.Tensor, state: dict, group: dict,
                     rows: slice = slice(None)) -> torch.Tensor:
        return O * scale_factor(O.shape, group["scale"])

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
            directions = [self.direction(p, self.transform_grad(p, full(p.grad), self.state[p]), self.state[p],
                                         group) for p, _ in params]
            pieces = [row_slices(rows, U.size(0)) for (_, rows), U in zip(params, directions)]
            ortho = iter(orthogonalize_many([U[r] for U, sl in zip(directions, pieces) for r in sl],
                                            group["backend"], group["ns_steps"],
                                            compute_dtype(params[0][0].device, group["dtype"])))
            for (p, _), sl in zip(params, pieces):
                parts = [self.shape_update(p, next(ortho), self.state[p], group, r) for r in sl]
                update = parts[0] if len(parts) == 1 else torch.cat(parts)
                # decoupled weight decay with the unscaled lr; a sharded p takes its rows of the update
                apply_(p, update, 1 - group["lr"] * group["weight_decay"], -group["lr"])
        return loss



def aux_adamw_default() -> AdamWSpec:
    # AdamW for embeddings (the tied head of GPT-2), untied heads and gains, for a user's own runs (a benchmark
    # replaces it by its shared group): AdamW's default lr 1e-3, a-priori (v1's 1e-2 had been picked on a
    # benchmark workload). No decay, as Keller's aux Adam.
    return AdamWSpec(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0, decay_groups=["embedding", "head"])


@dataclass
class MuonSpec:
    supports_fsdp: ClassVar[bool] = True  # runs on FSDP-sharded parameters (train.parallel=fsdp)
    lr: float = 0.02  # peak lr of the hidden matrices (Keller's default, with scale=keller)
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0  # decoupled: W <- W (1 - lr * weight_decay), Keller's default
    ns_steps: int = 5  # back-end iterations (QDWH: the maximum)
    backend: str = "ns"  # ns | polar_express | qdwh | svd
    scale: str = "keller"  # keller | moonlight | spectral (optimizers.md 1.3)
    dtype: str = "auto"  # NS dtype: auto (bf16 where measured fast) | fp32 | bf16 | fp64
    qkv: str = "split"  # GPT-2's fused c_attn: split (Q, K, V orthogonalized apart) | fused (one 3d x d matrix)
    aux: AdamWSpec = field(default_factory=aux_adamw_default)

    def validate(self, key: str = "optimizer") -> None:
        """Raise ValueError("<key>.<field>: ...") for impossible values, the auxiliary AdamW's included."""
        check_hparams(f"{key}.", lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                      ns_steps=self.ns_steps, backend=self.backend, scale=self.scale, dtype=self.dtype)
        check_qkv(f"{key}.", self.qkv)
        self.aux.validate(f"{key}.aux")

    def matrix_kwargs(self) -> dict:
        """The Muon constructor's keyword arguments (subclass specs add their own)."""
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "ns_steps": self.ns_steps, "backend": self.backend,
                "scale": self.scale, "dtype": self.dtype}

    def build(self, split: ParamSplit) -> Hybrid:
        hidden = [matrix_group(split.infos("hidden"), split.layout, self.qkv)]
        return with_aux_adamw(Muon(hidden, **self.matrix_kwargs()), split, self.aux)


def check_qkv(prefix: str, qkv: str) -> None:
    if qkv not in QKV_MODES:
        raise ValueError(f"{prefix}qkv: {qkv!r} is not one of {', '.join(QKV_MODES)}")
