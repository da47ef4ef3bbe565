"""Newton-Muon (Du & Su, "The Newton-Muon Optimizer", arXiv:2604.01472): Muon on each hidden matrix's raw
gradient right-multiplied by the damped inverse of an EMA of its layer-input second moment, G <- G K^-1
(docs/optimizers.md 3.3; reference: zhehangdu/Newton-Muon and modded-nanogpt track 3 record #15).

For a weight W (m x n, y = W x) with inputs Z (n x N tokens), per refresh step ((step+1) % k == 0):

    K <- beta K + (1 - beta) Z Z^T / N       (averaged over that step's micro-batches; K0 = 1e-3 I)
    K^-1 <- (K + (gamma tr(K)/n + 1e-8) I)^-1  (batched Cholesky in fp32; a failed block falls back to I)

and every step G <- G K^-1 before Muon's momentum (K^-1 = I until the first refresh: plain Muon). Inputs
arrive from the harness's forward hooks (harness/probes/hooks.py) on refresh steps only. Layers fed the same
input tensor in one forward (Llama's q/k/v, gate/up) share its Gram matrix, computed once. The MLP
down-projection (m x 4m) uses a block-diagonal K of m x m blocks, as the reference's 4-block c_proj.

    python train.py experiment=bench_tiny optimizer=newton_muon optimizer.refresh_every=16 optimizer.stats_beta=0.8
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from optimizers.groups import ParamSplit, matrix_group
from optimizers.hparams import knob
from optimizers.hybrid import CombinedOptimizer, with_aux_adamw
from optimizers.muon import Muon, MuonSpec


def block_layout(shape: torch.Size | tuple[int, int], block_wide: bool) -> tuple[int, int]:
    """(number of blocks, block size) of the input dimension n of an m x n weight: one n x n block, or for
    a wide matrix with block_wide the fewest equal blocks of size <= m (n / m of them when m divides n)."""
    m, n = shape
    if not block_wide or n <= m:
        return 1, n
    nb = -(-n // m)
    while n % nb:
        nb += 1
    return nb, n // nb


def input_gram(x: torch.Tensor, nb: int, b: int) -> torch.Tensor:
    """Diagonal blocks of Z Z^T / N for the inputs x (..., nb * b): (nb, b, b) in fp32."""
    z = x.reshape(-1, nb, b).float().transpose(0, 1)  # (nb, N, b)
    return z.mT @ z / z.size(1)


# Added to the damping, as the reference's precond_eps (zhehangdu/Newton-Muon train_gpt_newton_muon_1.py and
# modded-nanogpt track 3 #15): it matters only where tr(K)/n is tiny (inputs near zero), where it keeps the
# Cholesky factorisable.
RIDGE_EPS = 1e-8


def damped_inverse(K: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K + (ridge * tr(K)/b + 1e-8) I)^-1 for each (b, b) block of K (nb, b, b), by Cholesky; a block whose
    factorisation fails gets I. Returns the inverses and a bool per block (True = factorised)."""
    b = K.size(-1)
    eye = torch.eye(b, dtype=K.dtype, device=K.device)
    gamma = ridge * K.diagonal(dim1=-2, dim2=-1).sum(-1) / b + RIDGE_EPS  # scale-free damping (spec 3.3)
    L, info = torch.linalg.cholesky_ex(K + gamma[:, None, None] * eye)
    ok = info == 0
    return torch.where(ok[:, None, None], torch.cholesky_inverse(L), eye), ok


def precondition(grad: torch.Tensor, K_inv: torch.Tensor) -> torch.Tensor:
    """grad (m, n) @ blockdiag(K_inv) with K_inv (nb, b, b), nb * b = n, in fp32; returns grad's dtype."""
    m, n = grad.shape
    nb, b, _ = K_inv.shape
    g = grad.float().view(m, nb, b).transpose(0, 1)  # (nb, m, b)
    return (g @ K_inv.float()).transpose(0, 1).reshape(m, n).to(grad.dtype)


class NewtonMuon(Muon):
    """Muon with G <- G K^-1 in `transform_grad`; K, K^-1 and counters live in the optimizer state.

    Hyperparameters: a NewtonMuonSpec's (refresh_every, stats_beta, ridge, init_scale: `self.spec`). A param
    group's `block_wide` gives a wide matrix (n > m) a block-diagonal K (`block_layout`).
    State per matrix: K and K_inv (nb, b, b) fp32, `precond_step` (updates done), `refreshes`,
    `cholesky_failures` (blocks that fell back to I). The harness protocol (harness/probes/hooks.py):
    `wants_inputs(step)` is True on refresh steps, then `observe_input(weight, x)` once per layer and
    micro-batch; `step()` folds that step's statistics into K before Muon's update (`_refresh`).
    """

    def __init__(self, params, spec: NewtonMuonSpec):
        super().__init__(params, spec)
        self._owned = self._owners()
        self._stats: dict[int, list] = {}  # id(p) -> [sum of Z Z^T / N over forwards, number of forwards]
        # Inputs seen in the current forward: identity -> (input, Gram). Holding the input keeps its memory
        # from being reused, so an equal key means the same tensor (q/k/v fed one tensor share one Gram).
        self._forward: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: set[int] = set()  # matrices observed in the current forward

    def _owners(self) -> dict[int, tuple[torch.Tensor, dict]]:
        return {id(p): (p, g) for g in self.param_groups for p in g["params"]}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._owned = self._owners()  # loading replaces the group dicts

    def wants_inputs(self, step: int) -> bool:
        return (step + 1) % self.spec.refresh_every == 0

    def observe_input(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        p, group = self._owned.get(id(weight), (None, None))
        if p is not weight:
            raise ValueError(f"observe_input: a weight of shape {tuple(weight.shape)} is not a parameter of "
                             "this optimizer")
        if id(p) in self._seen:  # a matrix observed again: the next micro-batch's forward has begun
            self._forward.clear()
            self._seen.clear()
        self._seen.add(id(p))
        nb, b = block_layout(p.shape, group["block_wide"])
        if x.size(-1) != nb * b:
            raise ValueError(f"observe_input: input of width {x.size(-1)} for a weight of shape {tuple(p.shape)}")
        key = (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride(), b)
        if key not in self._forward:
            self._forward[key] = (x, input_gram(x, nb, b))
        gram = self._forward[key][1]
        if id(p) in self._stats:
            self._stats[id(p)][0] += gram
            self._stats[id(p)][1] += 1
        else:
            self._stats[id(p)] = [gram.clone(), 1]

    def transform_grad(self, p: torch.Tensor, grad: torch.Tensor, state: dict) -> torch.Tensor:
        if state["refreshes"] == 0:  # K^-1 is still exactly I: plain Muon, bit for bit
            return grad
        return precondition(grad, state["K_inv"])

    def update(self) -> None:
        self._refresh()  # after the closure (if any), whose forward delivers this step's inputs
        super().update()

    def _all_reduce_stats(self) -> None:
        """In a multi-process run each rank has seen only its own micro-batches: sum the Gram sums and the
        forward counts over ranks (one all_reduce each), so K is the single-process K on every rank."""
        if not self._stats or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        keys = [id(p) for g in self.param_groups for p in g["params"] if id(p) in self._stats]
        flat = torch.cat([self._stats[k][0].reshape(-1) for k in keys])
        counts = torch.tensor([float(self._stats[k][1]) for k in keys], dtype=torch.float64, device=flat.device)
        dist.all_reduce(flat)
        dist.all_reduce(counts)
        offset = 0
        for k, n in zip(keys, counts.tolist()):
            gram = self._stats[k][0]
            self._stats[k] = [flat[offset:offset + gram.numel()].view_as(gram), int(n)]
            offset += gram.numel()

    def _refresh(self) -> None:
        """Advance every matrix's counter; on a refresh step fold the observed statistics into K and
        recompute K^-1 (one batched Cholesky per block size and device)."""
        self._forward.clear()
        self._seen.clear()
        self._all_reduce_stats()
        due: dict[tuple, list[dict]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "K" not in state:
                    nb, b = block_layout(p.shape, group["block_wide"])
                    eye = torch.eye(b, dtype=torch.float32, device=p.device).repeat(nb, 1, 1)
                    state.update(K=self.spec.init_scale * eye, K_inv=eye, precond_step=0, refreshes=0,
                                 cholesky_failures=0)
                stats = self._stats.pop(id(p), None)
                step = state["precond_step"]
                state["precond_step"] += 1
                if (step + 1) % self.spec.refresh_every:
                    if stats is not None:
                        raise RuntimeError(f"NewtonMuon: layer inputs arrived on step {step}, which is not a "
                                           f"refresh step (refresh_every={self.spec.refresh_every}); the "
                                           "harness's step count and the optimizer's disagree")
                    continue
                if stats is None:
                    raise RuntimeError(f"NewtonMuon: no layer inputs for a {tuple(p.shape)} matrix on refresh "
                                       f"step {step}; deliver them with harness.probes.hooks.InputHooks "
                                       "(begin_step before the forward passes)")
                # The EMA of the per-step mean Z Z^T / N; the ridge is added only when inverting (spec 3.3).
                beta = self.spec.stats_beta
                state["K"].mul_(beta).add_(stats[0] / stats[1], alpha=1 - beta)
                due.setdefault((state["K"].shape[-1], p.device), []).append(state)
        failed = 0
        for states in due.values():
            inv, ok = damped_inverse(torch.cat([s["K"] for s in states]), self.spec.ridge)
            sizes = [s["K"].size(0) for s in states]
            for s, inv_s, ok_s in zip(states, inv.split(sizes), ok.split(sizes)):
                s["K_inv"] = inv_s.clone()
                s["refreshes"] += 1
                n_failed = int((~ok_s).sum())
                s["cholesky_failures"] += n_failed
                failed += n_failed
        if failed:
            warnings.warn(f"NewtonMuon: Cholesky failed for {failed} block(s); their K^-1 is I this refresh "
                          "(state['cholesky_failures'] counts them)", RuntimeWarning, stacklevel=3)


@dataclass
class NewtonMuonSpec(MuonSpec):
    # Muon's fields and defaults (lr, momentum, nesterov, weight_decay, ns_steps, backend, scale, dtype, qkv,
    # aux) plus the preconditioner's: Newton-Muon-1 of docs/optimizers.md 3.3 (measured:
    # conf/optimizer/newton_muon.yaml). The first four are the optimizer's (self.spec), block_wide per group.
    optimizer_class: ClassVar[type[Muon]] = NewtonMuon
    # k: statistics and K^-1 refreshed when (step + 1) % k == 0
    refresh_every: int = knob(32, ge=1, param_group=False)
    stats_beta: float = knob(0.95, ge=0, lt=1, param_group=False)  # EMA beta of K over refreshes
    ridge: float = knob(0.2, ge=0, param_group=False)  # gamma: K^-1 = (K + gamma tr(K)/n I)^-1
    # K0 = init_scale I (K0^-1 is never used: K^-1 = I until the first refresh)
    init_scale: float = knob(1e-3, gt=0, param_group=False)
    # MLP down-projection (d x 4d): block-diagonal K of d x d blocks, as the reference
    block_wide: bool = knob(True)

    def build(self, split: ParamSplit) -> CombinedOptimizer:
        # Only the MLP down-projection is blocked: the other wide matrices, GQA's k/v (kv_dim x d), read the
        # attention input that q reads, whose full d x d Gram is computed anyway (the reference's fused QKV
        # shares one d x d K); blocks would cost extra Grams and drop the cross-block correlations.
        infos = split.groups["hidden"]
        groups = [matrix_group([i for i in infos if (i.role == "mlp_down") == down], split.layout, self.qkv,
                               block_wide=self.block_wide and down) for down in (False, True)]
        return with_aux_adamw(self.optimizer_class([g for g in groups if g["params"]], self), split, self.aux)
