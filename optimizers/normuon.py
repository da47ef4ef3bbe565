"""NorMuon (Li, Liu, Liang, Chen & Zhao 2025, arXiv:2510.05491): Muon whose orthogonalized update is
re-balanced across output neurons by an Adam-like second moment of each row.

Per m x n matrix, after O = orthogonalize(Nesterov momentum) as in Muon (docs/optimizers.md 5.2):

    r_i = mean_j O_ij^2                     per-row mean square (row = output neuron of an (out, in) weight)
    v  <- beta2 v + (1 - beta2) r           fp32, starts at 0, no bias correction
    O^ = O / (sqrt(v) + 1e-10)              row-wise
    O^ <- O^ ||O||_F / (||O^||_F + 1e-10)   keep the Frobenius norm of O
    W  <- W (1 - lr wd) - lr s(m, n) O^     s: the Muon shape scale (keller by default)

This is the official code's convention (zichongli5/NorMuon normuon.py) as of commit 5320abe (2025-12-02), its
last version that runs on fp32 parameters: 939267f dropped the fp32 cast of the bf16 Newton-Schulz output,
and the fp32 second-moment buffer's lerp_ with that bf16 update then raises ("expected dtype float for `end`")
on fp32 parameters (checked with torch 2.13). The paper fixes the update RMS instead: lr_hat = 0.2 lr sqrt(mn) /
||O^||_F; with scale=moonlight here the RMS is 0.2 only for an exact polar factor, so the two agree up to the
back-end's inexactness.

    python train.py experiment=bench_tiny optimizer=normuon optimizer.beta2=0.95
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from optimizers.hparams import knob
from optimizers.muon import Muon, MuonSpec, scale_factor


def normuon_normalize(O: torch.Tensor, v: torch.Tensor, beta2: float) -> torch.Tensor:
    """Row-normalized O with its Frobenius norm kept (steps 3-6 above), computed in v's dtype (fp32 in the
    optimizer, as the official code's update.float()); updates the (m, 1) `v` in place."""
    Ov = O.to(v.dtype)
    v.lerp_(Ov.square().mean(dim=-1, keepdim=True), 1 - beta2)
    normed = Ov / (v.sqrt() + 1e-10)
    normed = normed * (Ov.norm() / (normed.norm() + 1e-10))
    return normed.to(O.dtype)


class NorMuon(Muon):
    """Muon plus per-row second-moment normalization (a NorMuonSpec's hyperparameters); `beta2` is the EMA
    factor of the row mean squares."""

    def shape_update(self, p: torch.Tensor, O: torch.Tensor, state: dict, group: dict,
                     rows: slice = slice(None)) -> torch.Tensor:
        if "second_momentum_buffer" not in state:
            state["second_momentum_buffer"] = torch.zeros(p.size(0), 1, dtype=torch.float32, device=p.device)
        # One matrix of a fused parameter (Q, K or V) normalizes its rows' v and keeps its own Frobenius norm,
        # as the three separate matrices of modded-nanogpt's NorMuon do; v[rows] is a view, updated in place.
        normed = normuon_normalize(O, state["second_momentum_buffer"][rows], group["beta2"])
        return normed * scale_factor(O.shape, group["scale"])


@dataclass
class NorMuonSpec(MuonSpec):
    optimizer_class: ClassVar[type[Muon]] = NorMuon
    beta2: float = knob(0.95, ge=0, lt=1)  # EMA factor of the per-row mean squares (official default)
