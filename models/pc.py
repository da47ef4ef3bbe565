"""PC layer (polynomial weight preconditioning): a linear layer whose forward uses W_eff = γ · s · f(W / s).

Wang et al., "PC Layer: Polynomial Weight Preconditioning for Improving LLM Pre-Training", arXiv:2606.06470
(code: github.com/Empath-aln/PC-layer, torchtitan/pc_layer/pc_layer.py); docs/optimizers.md section 6.
s ≈ σ_max(W) is a warm-started power-iteration estimate and f(σ) = σ p(σ²) a fixed odd polynomial with
f(1) = 1 that lifts small singular values toward 1, so each wrapped matrix acts better conditioned. The
optimizer still updates the raw W, which keeps its role (Muon orthogonalizes W's gradient); γ is a learnable
scalar gain (role "pc_gain"). Switched on per model by `model.pc_level` (models/base.py builds the layers):

    python train.py experiment=bench_tiny model.pc_level=4

After training, `merge_pc` folds W_eff into a plain model (no inference cost; scripts/merge_pc.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig

# p(t) = c0 + c1 t + ... (design 6.2, the reference's pc_level); each row sums to 1, so f(1) = 1.
PC_COEFFS = {
    1: (1.507, -0.507),
    2: (2.083, -1.643, 0.560),
    3: (2.909, -4.649, 4.023, -1.283),
    4: (3.625, -9.261, 14.097, -10.351, 2.890),
}
PC_ROLES = ("attn_out", "mlp_up", "mlp_gate", "mlp_down")  # the reference's default: FFN and attention output
QKV_ROLES = ("attn_qkv", "attn_q", "attn_k", "attn_v")  # only with model.pc_qkv (precondition_qk/_v)
S_EPS = 1e-7  # s = uᵀWv + 1e-7, the reference's pc_norm_eps
INIT_REFRESHES = 100  # cap on the refreshes at build (each of pc_power_iters iterations)


def pc_applies(cfg: ModelConfig, role: str) -> bool:
    return cfg.pc_level > 0 and (role in PC_ROLES or (cfg.pc_qkv and role in QKV_ROLES))


def pc_polynomial(x: torch.Tensor, level: int) -> torch.Tensor:
    """f(X) for X (..., m, n): X p(XᵀX) if tall (m >= n), else p(XXᵀ) X; every singular value σ -> σ p(σ²).

    The Gram matrix G (..., k, k), k = min(m, n), is taken on the small side and p(G) = c0 I + G (c1 I +
    G (...)) by Horner's rule: one Gram, level - 1 small products, one final product (design 6.5)."""
    c = PC_COEFFS[level]
    tall = x.size(-2) >= x.size(-1)
    g = x.mT @ x if tall else x @ x.mT  # (..., k, k)
    eye = torch.eye(g.size(-1), dtype=x.dtype, device=x.device)
    p = c[-1] * g
    for ck in reversed(c[1:-1]):
        p = g @ (p + ck * eye)
    p = p + c[0] * eye
    return x @ p if tall else p @ x


class PCLinear(nn.Linear):
    """nn.Linear whose forward uses W_eff = γ · f(W / s) · s.detach(), with s = uᵀWv + 1e-7 (design 6.2).

    A subclass of nn.Linear, so the harness's input hooks (Newton-Muon) see it like any other layer. With
    `blocks` > 1 the rows are `blocks` separate matrices, each with its own s, u, v and γ: GPT-2's fused
    [q; k; v] is preconditioned as the reference preconditions wq, wk, wv. Buffers (persistent, so a
    checkpoint resumes warm): u (blocks, out/blocks), v (blocks, in), unit vectors."""

    local_roles: ClassVar[dict[str, str]] = {"gamma": "pc_gain"}  # read by models.base.collect_roles

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, level: int,
                 power_iters: int, blocks: int = 1):
        super().__init__(in_features, out_features, bias)  # same parameters and RNG draws as nn.Linear
        if level not in PC_COEFFS:
            raise ValueError(f"pc level must be one of {sorted(PC_COEFFS)} (got {level})")
        if out_features % blocks:
            raise ValueError(f"out_features={out_features} is not divisible into {blocks} blocks")
        self.level, self.power_iters, self.blocks = level, power_iters, blocks
        self.gamma = nn.Parameter(torch.ones(blocks))  # γ, one per wrapped matrix (learnable_gamma, init 1)
        # Uniform unit vectors and one refresh make s valid (> 0) at once without drawing from the RNG (a
        # model's W initialisation stays that of the plain model); init_weights then calls reset_estimate.
        self.register_buffer("u", F.normalize(torch.ones(blocks, out_features // blocks), dim=-1))
        self.register_buffer("v", F.normalize(torch.ones(blocks, in_features), dim=-1))
        self.refresh()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pc_level={self.level}, blocks={self.blocks}"

    @torch.no_grad()
    def reset_estimate(self) -> None:
        """Random unit u, v (global RNG), then refreshes until s settles (relative change <= 1e-6, at most
        INIT_REFRESHES), so the first forward already uses a converged s. Random Gaussian weights have a
        small spectral gap: one refresh of 10 iterations leaves s 1-5% low, converging takes 50-200
        (measured on 128x128 to 512x128). Called by CausalLM.init_weights once W holds its initial values."""
        self.u.copy_(F.normalize(torch.randn_like(self.u), dim=-1))
        self.v.copy_(F.normalize(torch.randn_like(self.v), dim=-1))
        s = self.spectral_estimate()
        for _ in range(INIT_REFRESHES):
            self.refresh()
            s, previous = self.spectral_estimate(), s
            if self.weight.is_meta or bool(((s - previous).abs() <= 1e-6 * s).all()):
                break

    @torch.no_grad()
    def refresh(self) -> None:
        """`power_iters` power-iteration steps from the current u, v (warm start: after one optimizer step
        W has moved little, so a few iterations keep s on σ_max). Run outside autocast, after each step."""
        w = self.weight.view(self.blocks, -1, self.in_features)  # (blocks, m, n)
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        u, v = self.u.to(w.dtype), self.v.to(w.dtype)
        for _ in range(self.power_iters):
            v = F.normalize(torch.einsum("bmn,bm->bn", w, u), dim=-1)
            u = F.normalize(torch.einsum("bmn,bn->bm", w, v), dim=-1)
        self.u.copy_(u)
        self.v.copy_(v)

    def spectral_estimate(self) -> torch.Tensor:
        """s (blocks,) = uᵀ W v + 1e-7 per block, differentiable in W (u, v are constants)."""
        w = self.weight.view(self.blocks, -1, self.in_features)
        w = w.to(torch.promote_types(w.dtype, torch.float32))
        return torch.einsum("bm,bmn,bn->b", self.u.to(w.dtype), w, self.v.to(w.dtype)) + S_EPS

    def effective_weight(self) -> torch.Tensor:
        """W_eff (out, in), in fp32 (fp64 stays fp64); gradients reach W (also through s) and γ."""
        # The polynomial is evaluated in fp32 with autocast off: under bf16 autocast its matmuls would run
        # in bf16, and a degree-9 polynomial of W amplifies that rounding (design 6.5). Cost is per step,
        # independent of tokens, so fp32 is cheap here.
        with torch.autocast(self.weight.device.type, enabled=False):
            s = self.spectral_estimate()[:, None, None]  # (blocks, 1, 1)
            w = self.weight.view(self.blocks, -1, self.in_features).to(s.dtype)  # (blocks, m, n)
            x_pc = pc_polynomial(w / s, self.level)  # σ_max(W / s) ≈ 1, where f is designed to act
            w_eff = self.gamma.to(s.dtype)[:, None, None] * x_pc * s.detach()  # recover_w_norm, then γ
        return w_eff.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out); W_eff is cast back to the input dtype (autocast recasts as usual)."""
        return F.linear(x, self.effective_weight().to(x.dtype), self.bias)

    def poly_flops(self) -> int:
        """Forward FLOPs of f per call (design 6.5): Gram 2·M·k², (level - 1) products 2·k³, final 2·M·k²,
        with M, k = max, min of the block's shape; the O(M·k) scalings and uᵀWv are left out."""
        m, n = self.out_features // self.blocks, self.in_features
        big, small = max(m, n), min(m, n)
        return self.blocks * (4 * big * small**2 + 2 * (self.level - 1) * small**3)


def pc_layers(model: nn.Module) -> list[PCLinear]:
    return [m for m in model.modules() if isinstance(m, PCLinear)]


@torch.no_grad()
def merge_pc(model: nn.Module) -> nn.Module:
    """A plain model (pc_level 0) of the same family whose PC layers are nn.Linear with weight W_eff: the
    same function without the per-step polynomial (for inference and Hugging Face export). Gains γ and the
    u, v buffers are folded away; every other tensor is copied. `model` is left unchanged."""
    state = {k: t.clone() for k, t in model.state_dict().items()}
    for name, layer in model.named_modules():
        if isinstance(layer, PCLinear):
            state[f"{name}.weight"] = layer.effective_weight().to(layer.weight.dtype)
            for key in ("gamma", "u", "v"):
                del state[f"{name}.{key}"]
    with torch.device("meta"):  # no memory and no RNG draws: every tensor is assigned from `state`
        plain = type(model)(dataclasses.replace(model.cfg, pc_level=0))
    plain.load_state_dict(state, assign=True)
    return plain.train(model.training)
