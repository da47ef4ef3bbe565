"""Llama (Touvron et al. 2023): pre-RMSNorm blocks, rotary position embeddings (RoPE), SwiGLU MLP,
optional grouped-query attention (n_kv_head < n_head), untied output head, no biases.

Parameter names and the RoPE convention (rotate_half, as in Hugging Face's LlamaForCausalLM) equal
Hugging Face's, so models/hf.py copies weights one to one.
With model.pc_level > 0 the MLP and attention-output layers (and Q, K, V with model.pc_qkv) are PC
layers (models/pc.py); models/hf.py exports their merged weights.

    python -c "from models import ModelConfig, build_model; print(build_model(ModelConfig(family='llama')))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.base import CausalLM, declare, linear
from models.config import ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) * gain (Zhang & Sennrich 2019), normalised in fp32 like Hugging Face's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(T: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim); frequency i pairs dimension i with i + head_dim/2 (rotate_half)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq  # (T, head_dim/2)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by position; cos, sin (T, head_dim) broadcast over B and H."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.q_proj = linear(cfg, cfg.d_model, cfg.d_model, "attn_q", bias=False)
        self.k_proj = linear(cfg, cfg.d_model, kv_dim, "attn_k", bias=False)
        self.v_proj = linear(cfg, cfg.d_model, kv_dim, "attn_v", bias=False)
        self.o_proj = linear(cfg, cfg.d_model, cfg.d_model, "attn_out", bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Each group of n_head/n_kv_head query heads shares one k/v head. enable_gqa was as fast as
        # repeating k/v or faster on CPU (torch 2.13, B=4..16, T=256: 11.6 vs 12.3 ms, 15.1 vs 18.3 ms).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = linear(cfg, cfg.d_model, cfg.ffn_dim, "mlp_gate", bias=False)
        self.up_proj = linear(cfg, cfg.d_model, cfg.ffn_dim, "mlp_up", bias=False)
        self.down_proj = linear(cfg, cfg.ffn_dim, cfg.d_model, "mlp_down", bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = declare(RMSNorm(cfg.d_model, cfg.norm_eps), "norm")
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = declare(RMSNorm(cfg.d_model, cfg.norm_eps), "norm")
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    tied_head = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.ModuleDict({
            "embed_tokens": declare(nn.Embedding(cfg.vocab_size, cfg.d_model), "embed"),
            "layers": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            "norm": declare(RMSNorm(cfg.d_model, cfg.norm_eps), "norm"),
        })
        self.lm_head = declare(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False), "head")
        self.init_weights()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx, targets: (B, T) token ids -> logits (B, T, vocab_size), mean loss or None."""
        self.check_length(idx)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        # Recomputed per call (T x head_dim/2 products, negligible) rather than cached in a buffer that a
        # meta-device build or a cast to bf16 would spoil; computed in fp32 and cast, as Hugging Face does.
        cos, sin = (t.to(x.dtype) for t in rope_cos_sin(idx.size(1), self.cfg.head_dim, self.cfg.rope_theta,
                                                          idx.device))
        for block in self.model.layers:
            x = block(x, cos, sin)
        return self.head_and_loss(self.model.norm(x), self.lm_head.weight, targets)  # logits (B, T, V)
