"""The model config schema and the parameter roles every family declares.

`ModelConfig` is the typed `model` node of the run config (conf/model/*.yaml are its presets). Roles
tell optimizers what each parameter is; models/base.py declares them where layers are built. A user's own
model class is named by `_target_` (models/__init__.py: the interface it implements).

    python -c "from models.config import ModelConfig; ModelConfig(d_model=100, n_head=3).validate()"
    # -> ValueError: model.n_head: d_model=100 is not divisible by n_head=3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("gpt2", "llama")

# Every trainable tensor has exactly one role; optimizers see only roles, never parameter names.
ROLES = ("embed", "pos_embed", "head", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out",
         "mlp_up", "mlp_gate", "mlp_down", "norm", "bias", "pc_gain")
# The coarse split every optimizer uses (matrix methods act on "hidden", AdamW takes the rest).
ROLE_GROUP = {"embed": "embedding", "pos_embed": "embedding", "head": "head", "norm": "gain_bias",
              "bias": "gain_bias", "pc_gain": "gain_bias",  # pc_gain: a PC layer's scalar gain (models/pc.py)
              **{r: "hidden" for r in ROLES if r.startswith(("attn_", "mlp_"))}}


@dataclass
class ModelConfig:
    family: str = "gpt2"  # gpt2 | llama; with _target_ any label (gpt2/llama: their head checks apply)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None = n_head; fewer = grouped-query attention (llama only)
    d_model: int = 128
    d_ff: int | None = None  # None: gpt2 4*d_model; llama int(8*d_model/3) rounded up to 256
    vocab_size: int = 4096
    block_size: int = 256  # maximum context length
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # llama only
    init_std: float = 0.02
    # PC layer (models/pc.py, arXiv:2606.06470). The harness leaves pc_* out of the workload hash: a method
    # option, compared on the same workload as the plain model.
    pc_level: int = 0  # 0 = off; 1-4 = degree of the polynomial p (the paper: 4 with AdamW, 2 with Muon)
    pc_qkv: bool = False  # also precondition Q, K, V (reference default: off); ignored when pc_level = 0
    pc_power_iters: int = 10  # power-iteration steps refreshing the estimate of sigma_max after each step
    # A user's model: the class (module.Class, importable, e.g. from a directory of OPTBENCH_CONFIG_PATH)
    # built as cls(this config) instead of the family's, and its own options, which only that class reads.
    _target_: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return -(-int(8 * self.d_model / 3) // 256) * 256  # Llama's multiple_of=256 rule

    def validate(self) -> None:
        """Raise ValueError("model.<key>: ...") on the first inconsistent value."""
        if self._target_ is None and self.family not in FAMILIES:
            raise ValueError(f"model.family: {self.family!r} is not one of {', '.join(FAMILIES)} (or name "
                             "your model's class in model._target_)")
        if self._target_ is None and self.options:
            raise ValueError(f"model.options: {sorted(self.options)}: only a model class named in "
                             f"model._target_ reads options; {self.family} takes none")
        if self._target_ is not None:
            from models import model_class

            model_class(self._target_)  # importable and an nn.Module class, before any compute
        for key in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "block_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"model.{key}: must be > 0 (got {value})")
        if self.family in FAMILIES:  # a user's model under its own label (_target_) checks its own shapes
            self.check_attention()
        for key in ("norm_eps", "rope_theta", "init_std"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}: must be > 0 (got {getattr(self, key)})")
        if self.pc_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"model.pc_level: must be 0 (off) or a degree 1-4 (got {self.pc_level})")
        if self.pc_power_iters <= 0:
            raise ValueError(f"model.pc_power_iters: must be > 0 (got {self.pc_power_iters})")

    def check_attention(self) -> None:
        """The head counts the built-in families need (GPT-2: no GQA; Llama: RoPE's even head_dim)."""
        if self.d_model % self.n_head:
            raise ValueError(f"model.n_head: d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_kv_head: n_head={self.n_head} is not divisible by "
                             f"n_kv_head={self.kv_heads}")
        if self.family == "gpt2" and self.kv_heads != self.n_head:
            raise ValueError(f"model.n_kv_head: gpt2 has no grouped-query attention (got {self.n_kv_head} "
                             f"with n_head={self.n_head}); leave it null")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"model.n_head: RoPE needs an even head_dim, d_model/n_head = {self.head_dim}")
