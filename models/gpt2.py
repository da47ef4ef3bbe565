"""GPT-2 (Radford et al. 2019) as in nanoGPT: pre-LayerNorm blocks, fused QKV, GELU (tanh) MLP, learned
absolute positions, token embedding tied to the output head, no dropout.

Parameter names equal Hugging Face's GPT2LMHeadModel (models/hf.py only transposes its Conv1D weights).
With model.pc_level > 0 the MLP and attention-output layers (and the fused QKV, as three blocks q, k, v,
with model.pc_qkv) are PC layers (models/pc.py); models/hf.py exports their merged weights.

    python -c "from models import ModelConfig, build_model; print(build_model(ModelConfig()).num_params())"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CausalLM, declare, linear
from models.config import ModelConfig


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = linear(cfg, cfg.d_model, 3 * cfg.d_model, "attn_qkv", blocks=3)  # rows: [q; k; v]
        self.c_proj = linear(cfg, cfg.d_model, cfg.d_model, "attn_out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = linear(cfg, cfg.d_model, cfg.ffn_dim, "mlp_up")
        self.c_proj = linear(cfg, cfg.ffn_dim, cfg.d_model, "mlp_down")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tanh approximation is GPT-2's original "gelu_new", so logits match Hugging Face exactly.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = declare(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), "norm")
        self.attn = SelfAttention(cfg)
        self.ln_2 = declare(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), "norm")
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    tied_head = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict({
            "wte": declare(nn.Embedding(cfg.vocab_size, cfg.d_model), "embed"),  # also the output head
            "wpe": declare(nn.Embedding(cfg.block_size, cfg.d_model), "pos_embed"),
            "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            "ln_f": declare(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps), "norm"),
        })
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) token ids -> logits (B, T, vocab_size), mean loss or None."""
        self.check_length(idx)
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x)
        # The head reuses the embedding matrix (weight tying, Press & Wolf 2017): (B, T, C) -> (B, T, V).
        return self.head_and_loss(self.transformer.ln_f(x), self.transformer.wte.weight, targets)
