"""What every model family shares: role declarations and the `CausalLM` base class.

A layer declares its role where it is built (`declare(nn.Linear(...), "attn_qkv")`) and `collect_roles`
reads the declarations back, failing if any parameter is unclaimed. `CausalLM` derives initialisation,
parameter counts and FLOPs from roles.

    python -c "from models import ModelConfig, build_model; print(build_model(ModelConfig()).param_roles())"
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ROLE_GROUP, ROLES, ModelConfig


def declare(module: nn.Module, role: str) -> nn.Module:
    """Give `module.weight` the role `role`; its bias, if any, gets the role "bias"."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    module.role = role
    return module


def collect_roles(model: nn.Module) -> dict[str, str]:
    """Map each name of `model.named_parameters()` to its declared role; every parameter must be declared."""
    declared = {}
    for prefix, module in model.named_modules():
        role = getattr(module, "role", None)
        if role is None:
            continue
        for local, _ in module.named_parameters(recurse=False):
            # A LayerNorm's bias is a bias; its weight (the gain) carries the module's role "norm". Any
            # other parameter of a declared module stays undeclared and is reported below.
            if local in ("weight", "bias"):
                declared[f"{prefix}.{local}" if prefix else local] = role if local == "weight" else "bias"
    names = [name for name, _ in model.named_parameters()]
    missing = sorted(set(names) - set(declared))
    if missing:
        raise RuntimeError(f"parameters without a declared role: {missing}")
    return {name: declared[name] for name in names}


class CausalLM(nn.Module):
    """Base of GPT2 and Llama: subclasses set `cfg`, `tied_head` and build layers with `declare`."""

    cfg: ModelConfig
    tied_head: bool  # True when the token embedding is also the output head (GPT-2)

    def param_roles(self) -> dict[str, str]:
        return collect_roles(self)

    def attn_layout(self) -> dict:
        return {"n_head": self.cfg.n_head, "n_kv_head": self.cfg.kv_heads, "head_dim": self.cfg.head_dim}

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) matrices, unit gains, zero biases; the two projections that write into the
        residual stream (attn_out, mlp_down) get std / sqrt(2 * n_layer) (GPT-2 paper, section 2.3)."""
        std = self.cfg.init_std
        for name, role in self.param_roles().items():
            p = self.get_parameter(name)
            if role == "norm":
                p.fill_(1.0)
            elif role == "bias":
                p.zero_()
            elif role in ("attn_out", "mlp_down"):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; with non_embedding, minus the lookup tables (position embeddings, and the
        token embedding unless it is tied to the head, where it is a matmul weight: nanoGPT's count)."""
        roles = self.param_roles()
        n = 0
        for name, p in self.named_parameters():
            lookup = ROLE_GROUP[roles[name]] == "embedding" and not (roles[name] == "embed" and self.tied_head)
            n += 0 if non_embedding and lookup else p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token = 6 * N_matmul + 6 * n_layer * d_model * seq_len.

        N_matmul counts every weight used in a matmul, the LM head included (= non-embedding parameters
        minus gains and biases); 6 = 2 (multiply-add) x 3 (forward + backward). Attention scores and the
        weighted sum cost 2 * 2 * d_model * (t + 1) forward for the token at position t; averaged over a
        causal sequence that is 2 * d_model * seq_len (dropping the +1), times 3 for training. PaLM's
        (and nanoGPT's MFU) 12 * n_layer * d_model * seq_len also counts the masked half of the scores."""
        roles = self.param_roles()
        gains = sum(p.numel() for name, p in self.named_parameters() if ROLE_GROUP[roles[name]] == "gain_bias")
        n_matmul = self.num_params(non_embedding=True) - gains
        return 6.0 * n_matmul + 6.0 * self.cfg.n_layer * self.cfg.d_model * seq_len

    def check_length(self, idx: torch.Tensor) -> None:
        if idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds model.block_size={self.cfg.block_size}")

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean next-token cross-entropy over (B, T), computed in fp32 even under bf16 autocast."""
        if targets is None:
            return None
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
