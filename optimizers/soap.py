"""SOAP (Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and Stabilizing
Shampoo using Adam", arXiv:2409.11321, ICLR 2025): Adam run in the eigenbasis of Shampoo's preconditioner, on
the hidden matrices; an auxiliary AdamW takes embeddings, head and gains/biases (optimizers/hybrid.py).

Per m x n matrix W with gradient G, lr eta, betas (b1, b2), eps, weight decay lambda, frequency f; the
state follows the reference code (nikhilvyas/SOAP soap.py, docs/optimizers.md 7):

    first call:  L = (1 - b2) G G^T,  R = (1 - b2) G^T G,  Q_L, Q_R = their eigenbases;  W is not moved
                 (not even decayed): "so that we never use the current gradients in the projection"
    step t = 1, 2, ...
        G' = Q_L^T G Q_R                                   the rotated gradient
        M <- b1 M + (1 - b1) G;   M' = Q_L^T M Q_R         first moment: original space, rotated each step
        V <- b2 V + (1 - b2) G'^2                          second moment: in the rotated space
        W <- W (1 - eta lambda) - eta sqrt(1 - b2^t) / (1 - b1^t) Q_L (M' / (sqrt(V) + eps)) Q_R^T
        L <- b2 L + (1 - b2) G G^T;  R <- b2 R + (1 - b2) G^T G        (after the update, as the reference)
        if t % f == 0: Q_L, Q_R <- eigenbases of L, R; V's rows (columns) are permuted by the descending
                       order of diag(Q_old^T L Q_old) (of R), as the reference does; V is not rotated

Q's columns are eigenvectors by descending eigenvalue. Choices, against the reference:
- Every basis comes from torch.linalg.eigh (exact), in fp32 whatever the device, retried in fp64 if fp32
  fails; if both fail (or give non-finite vectors) the side keeps its previous basis (identity the first
  time) with a warning. The reference uses eigh only the first time, then one power-iteration step + QR.
- M is stored rotated, M' = Q_L^T M Q_R, and re-expressed when the basis changes: the same maths as
  rotating an original-space M each step (the reference projects its exp_avg back and forth around every
  step), with 3 pairs of (m x m or n x n) matmuls per step instead of 4 (the reference's code: 5).
- Weight decay multiplies W before the update (as torch's AdamW and Muon here), the reference after it: the
  update differs by a factor (1 - eta lambda), ~3e-5 at the defaults.
- Fixed at the reference's defaults, not options: L, R use b2 (shampoo_beta=-1), bias correction on,
  normalize_grads off, merge_dims and precondition_1d off (2-D matrices only).
A side longer than max_precond_dim keeps the identity (no L or R there), as the reference. Embeddings and
the head stay on AdamW: the 4096 x 128 embedding's L would be a 4096 x 4096 matrix to eigendecompose.

    python train.py experiment=bench_tiny optimizer=soap optimizer.precondition_frequency=10
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

from optimizers.adamw import AdamWSpec
from optimizers.groups import ParamSplit, require_matrices
from optimizers.hparams import Spec, SpecOptimizer, knob
from optimizers.hybrid import CombinedOptimizer, aux_adamw, with_aux_adamw


def rotate(X: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Q_L^T X Q_R (a side without a basis is the identity)."""
    X = X if QL is None else QL.T @ X
    return X if QR is None else X @ QR


def rotate_back(X: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Q_L X Q_R^T, the inverse of rotate() for orthogonal bases."""
    X = X if QL is None else QL @ X
    return X if QR is None else X @ QR.T


def soap_direction(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, QL: torch.Tensor | None,
                   QR: torch.Tensor | None, *, step: int, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """sqrt(1 - b2^t) / (1 - b1^t) Q_L (M' / (sqrt(V) + eps)) Q_R^T for update t = `step` >= 1: what W moves
    along, times lr (before weight decay). Updates M' (`exp_avg`, rotated) and V (`exp_avg_sq`) in place."""
    b1, b2 = betas
    g = rotate(grad, QL, QR)
    exp_avg.lerp_(g, 1 - b1)  # = Q_L^T (b1 M + (1 - b1) G) Q_R
    exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    scale = math.sqrt(1 - b2**step) / (1 - b1**step)
    return rotate_back(exp_avg / (exp_avg_sq.sqrt() + eps), QL, QR).mul_(scale)


def accumulate_(grad: torch.Tensor, L: torch.Tensor | None, R: torch.Tensor | None, beta: float) -> None:
    """L <- beta L + (1 - beta) G G^T and R <- beta R + (1 - beta) G^T G, in place (None: side skipped)."""
    if L is not None:
        L.lerp_(grad @ grad.T, 1 - beta)
    if R is not None:
        R.lerp_(grad.T @ grad, 1 - beta)


def eigenbasis(S: torch.Tensor) -> torch.Tensor | None:
    """Eigenvectors of the symmetric S as columns, by descending eigenvalue, in S's dtype: torch.linalg.eigh
    in fp32, retried in fp64; None if both fail or return non-finite vectors (CUDA may not raise)."""
    for dtype in (torch.float32, torch.float64):
        try:
            Q = torch.linalg.eigh(S.to(dtype)).eigenvectors
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence (e.g. NaN/inf in S)
            continue
        if torch.isfinite(Q).all():
            return Q.flip(-1).to(S.dtype)
    return None


def initial_basis(S: torch.Tensor | None) -> torch.Tensor | None:
    """The first basis of one side: eigenbasis(S), the identity if eigh fails, None for a side without S."""
    if S is None:
        return None
    Q = eigenbasis(S)
    if Q is None:
        warnings.warn("SOAP: eigh failed on the first preconditioner; that side starts with the identity basis")
        return torch.eye(S.shape[0], dtype=S.dtype, device=S.device)
    return Q


def refresh_side(S: torch.Tensor | None, Q: torch.Tensor | None, exp_avg_sq: torch.Tensor,
                 dim: int) -> torch.Tensor | None:
    """The new basis of one side, permuting V along `dim` (0: L's side, 1: R's) in place by the descending
    order of the old columns' Rayleigh quotients diag(Q^T S Q), as the reference; Q itself if eigh fails."""
    if S is None:
        return None
    new = eigenbasis(S)
    if new is None:
        warnings.warn("SOAP: eigh failed on a preconditioner; keeping the previous basis")
        return Q
    order = torch.argsort(torch.einsum("ij,ij->j", Q, S @ Q), descending=True)
    exp_avg_sq.copy_(exp_avg_sq.index_select(dim, order))
    return new


def refresh_bases(L: torch.Tensor | None, R: torch.Tensor | None, QL: torch.Tensor | None, QR: torch.Tensor | None,
                  exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """New (Q_L, Q_R) from L and R; V permuted and M' re-expressed in the new bases, in place."""
    M = rotate_back(exp_avg, QL, QR)
    QL, QR = refresh_side(L, QL, exp_avg_sq, 0), refresh_side(R, QR, exp_avg_sq, 1)
    exp_avg.copy_(rotate(M, QL, QR))
    return QL, QR


class SOAP(SpecOptimizer):
    """SOAP over param groups of 2-D matrices (non-2-D parameters are refused), with a SOAPSpec's
    hyperparameters. State per matrix, all fp32: "step" (updates taken, an int), "exp_avg" (M', rotated),
    "exp_avg_sq" (V), "L", "QL" (m x m) and "R", "QR" (n x n), None for a side that is not rotated. p.grad is
    never modified."""

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        require_matrices(type(self).__name__, self.param_groups[-1]["params"])

    @staticmethod
    def init_state(grad: torch.Tensor, state: dict, group: dict) -> None:
        """The first call: zero moments, L and R from this gradient and their eigenbases (None: a side longer
        than max_precond_dim, not rotated)."""
        state["step"] = 0
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        state["L"], state["R"] = (torch.zeros(k, k, dtype=grad.dtype, device=grad.device)
                                  if k <= group["max_precond_dim"] else None for k in grad.shape)
        accumulate_(grad, state["L"], state["R"], group["betas"][1])
        state["QL"], state["QR"] = initial_basis(state["L"]), initial_basis(state["R"])

    def update(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad.float(), self.state[p]
                if not state:
                    self.init_state(grad, state, group)
                    continue  # the reference skips the update on the first step
                state["step"] += 1
                direction = soap_direction(grad, state["exp_avg"], state["exp_avg_sq"], state["QL"], state["QR"],
                                           step=state["step"], betas=group["betas"], eps=group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, with the unscaled lr
                p.add_(direction.to(p.dtype), alpha=-group["lr"])
                accumulate_(grad, state["L"], state["R"], group["betas"][1])
                if state["step"] % group["precondition_frequency"] == 0:
                    state["QL"], state["QR"] = refresh_bases(state["L"], state["R"], state["QL"], state["QR"],
                                                             state["exp_avg"], state["exp_avg_sq"])


@dataclass
class SOAPSpec(Spec):
    lr: float = knob(3e-3, gt=0)  # peak lr of the hidden matrices (reference README)
    betas: list[float] = knob([0.95, 0.95], pair_in=(0, 1))  # Adam's (b1, b2); b2 also for L, R
    eps: float = knob(1e-8, gt=0)
    weight_decay: float = knob(0.01, ge=0)  # decoupled: W <- W (1 - lr * weight_decay)
    precondition_frequency: int = knob(10, ge=1)  # updates between eigenbasis refreshes
    max_precond_dim: int = knob(10000, ge=1)  # a side longer than this is not rotated (identity basis)
    # The auxiliary AdamW at SOAP's own lr: the reference runs one lr over all parameters (untuned); its
    # single group would also decay embeddings by lr * 0.01 = 3e-5 per step, negligible (no decay here).
    aux: AdamWSpec = field(default_factory=partial(aux_adamw, lr=3e-3))

    def build(self, split: ParamSplit) -> CombinedOptimizer:
        hidden = [{"params": split.params("hidden"), "group": "hidden"}]
        return with_aux_adamw(SOAP(hidden, self), split, self.aux)
