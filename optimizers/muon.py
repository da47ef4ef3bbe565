"""Muon (Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"): Nesterov
momentum, then the momentum's polar factor (Newton-Schulz by default) as the update of each hidden matrix;
an auxiliary AdamW takes embeddings, head and gains (optimizers/hybrid.py).

Update per m x n matrix W with gradient G (docs/optimizers.md 1.2), lr eta, momentum beta, weight decay lambda:

    M <- beta M + (1 - beta) G;   U = lerp(G, M, beta)  (Nesterov; U = M without)
    O = orthogonalize(U)          (ns | polar_express | qdwh | svd, optimizers/ortho.py)
    W <- W (1 - eta lambda) - eta s(m, n) O

with the shape scale s (docs/optimizers.md 1.3): "keller" sqrt(max(1, m/n)) (update RMS 1/sqrt(n) = 1/sqrt(fan_in)),
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
    join_rows,
    matrices_with_grad,
    matrix_group,
    require_matrices,
    row_slices,
    split_rows,
)
from optimizers.hparams import Spec, SpecOptimizer, knob
from optimizers.hybrid import CombinedOptimizer, aux_adamw, with_aux_adamw
from optimizers.ortho import METHODS, compute_dtype, dtype_problem, orthogonalize, orthogonalize_many
from optimizers.sharded import apply_update_, unshard

SCALES = {
    "keller": lambda m, n: math.sqrt(max(1.0, m / n)),
    "moonlight": lambda m, n: 0.2 * math.sqrt(max(m, n)),
    "spectral": lambda m, n: math.sqrt(m / n),
}


def scale_factor(shape: torch.Size | tuple[int, int], scale: str) -> float:
    """The shape-dependent multiplier of the orthogonalized update, by convention name (docs/optimizers.md 1.3)."""
    return SCALES[scale](shape[-2], shape[-1])


def momentum_direction(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool) -> torch.Tensor:
    """EMA momentum buf <- beta buf + (1 - beta) grad (in place), and the direction to orthogonalize:
    lerp(grad, buf, beta) with Nesterov, else buf. `grad` is left untouched (Keller's code overwrites p.grad)."""
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


def muon_update(grad: torch.Tensor, buf: torch.Tensor, *, momentum: float, nesterov: bool, backend: str,
                steps: int | None, dtype: torch.dtype, scale: str) -> torch.Tensor:
    """s(m, n) * orthogonalize(momentum direction): what W moves along, times lr (before weight decay), for
    one matrix. Updates `buf` in place; returns grad's dtype."""
    U = momentum_direction(grad, buf, momentum=momentum, nesterov=nesterov)
    return orthogonalize(U, backend, steps, dtype) * scale_factor(grad.shape, scale)


class Muon(SpecOptimizer):
    """Muon over param groups of 2-D matrices (like torch.optim.Muon; non-2-D parameters are refused), with
    the hyperparameters of a MuonSpec.

    `ns_steps` is the iteration count of the back-end (NS/Polar Express steps, QDWH's maximum; unused by
    svd); `dtype` the NS/Polar Express dtype ("auto": bf16 where measured fast, else fp32). Same-shape
    matrices of a group are orthogonalized in one batched call.

    Subclasses change one stage of `update()` by overriding it; each works on one parameter:

        transform_grad(p, grad, state) -> grad      raw gradient, before momentum (Newton-Muon: G K^-1);
                                                    default: unchanged
        direction(p, grad, state, group) -> U       momentum + Nesterov (what gets orthogonalized)
        shape_update(p, O, state, group, rows)      polar factor of the rows `rows` of p (one matrix of a
                    -> update                       fused parameter, or all of p) -> their update (NorMuon:
                                                    row normalization); default: O * scale_factor(O.shape)

    then `update()` applies W <- W (1 - lr wd) - lr * update. p.grad is never modified. A group's optional
    "row_blocks" (one tuple of row counts per parameter, optimizers/groups.py: matrix_group) cuts a parameter
    into separate matrices for the orthogonalization and shape_update; without it each parameter is one.
    """

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

    def update(self) -> None:
        for group in self.param_groups:
            params = matrices_with_grad(group)
            if not params:
                continue
            directions = [self.direction(p, self.transform_grad(p, unshard(p.grad), self.state[p]),
                                         self.state[p], group) for p, _ in params]
            pieces = [row_slices(rows, U.size(0)) for (_, rows), U in zip(params, directions)]
            dtype = compute_dtype(params[0][0].device, group["dtype"])
            matrices = split_rows(directions, pieces)
            ortho = iter(orthogonalize_many(matrices, group["backend"], group["ns_steps"], dtype))
            for (p, _), sl in zip(params, pieces):
                update = join_rows([self.shape_update(p, next(ortho), self.state[p], group, r) for r in sl])
                # decoupled weight decay with the unscaled lr; a sharded p takes its rows of the update
                apply_update_(p, update, 1 - group["lr"] * group["weight_decay"], -group["lr"])


@dataclass
class MuonSpec(Spec):
    supports_fsdp: ClassVar[bool] = True  # runs on FSDP-sharded parameters (train.parallel=fsdp)
    optimizer_class: ClassVar[type[Muon]] = Muon  # what build() makes (a variant's spec names its own)
    lr: float = knob(0.02, gt=0)  # peak lr of the hidden matrices (Keller's default, with scale=keller)
    momentum: float = knob(0.95, ge=0, lt=1)
    nesterov: bool = knob(True)
    weight_decay: float = knob(0.0, ge=0)  # decoupled: W <- W (1 - lr * weight_decay), Keller's default
    ns_steps: int = knob(5, ge=1)  # back-end iterations (QDWH: the maximum)
    backend: str = knob("ns", choices=METHODS)  # ns | polar_express | qdwh | qdwh_ns | svd
    scale: str = knob("keller", choices=tuple(SCALES))  # keller | moonlight | spectral (docs/optimizers.md 1.3)
    # NS dtype: auto (bf16 where measured fast) | fp32 | bf16 | fp64
    dtype: str = knob("auto", check=dtype_problem)
    # GPT-2's fused c_attn: split (Q, K, V orthogonalized apart) | fused (one 3d x d matrix)
    qkv: str = knob("split", choices=QKV_MODES, param_group=False)
    aux: AdamWSpec = field(default_factory=aux_adamw)

    def build(self, split: ParamSplit) -> CombinedOptimizer:
        hidden = [matrix_group(split.infos("hidden"), split.layout, self.qkv)]
        return with_aux_adamw(self.optimizer_class(hidden, self), split, self.aux)
