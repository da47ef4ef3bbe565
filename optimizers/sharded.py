"""Matrix optimizers on FSDP2-sharded parameters (train.parallel=fsdp): gather, orthogonalize, re-shard.

A sharded parameter is a DTensor whose rows are split over the ranks. Muon-family methods and PolarGrad need
whole matrices, so their step gathers each gradient (`unshard`), runs the method on the full matrix (momentum
and the other per-matrix state are kept whole, replicated on every rank; the orthogonalization itself is
shared across ranks, optimizers/ortho.py), and each rank applies its own rows of the update
(`apply_update_`). On plain tensors both are the identity, so single-process and DDP runs are unchanged bit
for bit.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def unshard(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a sharded DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def apply_update_(p: torch.Tensor, update: torch.Tensor, decay: float, alpha: float) -> None:
    """p <- p * decay + alpha * update, with `update` the whole matrix; a sharded p takes its own shard
    (local slicing, no communication: every rank holds the same whole update)."""
    if isinstance(p, DTensor):
        update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
    p.mul_(decay)
    p.add_(update, alpha=alpha)
