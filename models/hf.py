"""Conversion between our models and Hugging Face transformers (GPT2LMHeadModel, LlamaForCausalLM).

Parameter names are the same on both sides; the only difference is that Hugging Face's GPT-2 stores its
linear layers as Conv1D with (in, out) weights, which we transpose. A model with PC layers (models/pc.py)
is exported through its merged weights W_eff (Hugging Face has no PC layer; the function is the same).
Kept out of models/__init__ so that importing the models does not import transformers.

    python -c "from models import ModelConfig as C, build_model; from models.hf import to_hf; print(to_hf(build_model(C())))"
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from models import ModelConfig, build_model
from models.pc import merge_pc


def hf_config(cfg: ModelConfig) -> GPT2Config | LlamaConfig:
    """The Hugging Face config of the same architecture (no dropout; no special token ids, since ours
    come from the run's tokenizer, not GPT-2's or Llama's)."""
    cfg.validate()
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.ffn_dim, activation_function="gelu_new", resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
            tie_word_embeddings=True, **tokens)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.block_size,
        rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, initializer_range=cfg.init_std,
        **tokens)


def model_config(hf: GPT2Config | LlamaConfig) -> ModelConfig:
    """Inverse of hf_config; refuses Hugging Face options our models do not implement."""
    if hf.model_type == "gpt2":
        unsupported = {"activation_function": (hf.activation_function, "gelu_new"),
                       "scale_attn_by_inverse_layer_idx": (hf.scale_attn_by_inverse_layer_idx, False),
                       "reorder_and_upcast_attn": (hf.reorder_and_upcast_attn, False),
                       "tie_word_embeddings": (hf.tie_word_embeddings, True)}
        cfg = ModelConfig(family="gpt2", n_layer=hf.n_layer, n_head=hf.n_head, d_model=hf.n_embd,
                          d_ff=hf.n_inner or 4 * hf.n_embd, vocab_size=hf.vocab_size, block_size=hf.n_positions,
                          norm_eps=hf.layer_norm_epsilon, init_std=hf.initializer_range)
    elif hf.model_type == "llama":
        unsupported = {"hidden_act": (hf.hidden_act, "silu"), "attention_bias": (hf.attention_bias, False),
                       "mlp_bias": (hf.mlp_bias, False), "tie_word_embeddings": (hf.tie_word_embeddings, False),
                       "rope_type": (hf.rope_parameters["rope_type"], "default"),
                       "head_dim": (hf.head_dim, hf.hidden_size // hf.num_attention_heads)}
        cfg = ModelConfig(family="llama", n_layer=hf.num_hidden_layers, n_head=hf.num_attention_heads,
                          n_kv_head=hf.num_key_value_heads, d_model=hf.hidden_size, d_ff=hf.intermediate_size,
                          vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings,
                          norm_eps=hf.rms_norm_eps, rope_theta=hf.rope_parameters["rope_theta"],
                          init_std=hf.initializer_range)
    else:
        raise ValueError(f"model_type {hf.model_type!r} has no counterpart here (gpt2, llama)")
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{hf.model_type} config: {key}={got!r} is not supported (only {want!r})")
    return cfg


def _conv1d_weights(hf: PreTrainedModel) -> set[str]:
    """Names of the (in, out)-shaped Conv1D weights that must be transposed."""
    return {f"{name}.weight" for name, module in hf.named_modules() if isinstance(module, Conv1D)}


@torch.no_grad()
def to_hf(model: torch.nn.Module) -> PreTrainedModel:
    """A Hugging Face model with our model's weights (copied, fp32), in eval mode; PC layers are merged
    first (their effective weights are exported, `model` itself is unchanged)."""
    if model.cfg.pc_level:
        model = merge_pc(model)
    cls = GPT2LMHeadModel if model.cfg.family == "gpt2" else LlamaForCausalLM
    hf = cls(hf_config(model.cfg)).float().eval()
    transposed = _conv1d_weights(hf)
    ours = dict(model.named_parameters())
    for name, p in hf.named_parameters():  # deduplicated: GPT-2's tied lm_head.weight is not listed
        src = ours.pop(name)
        p.copy_(src.t() if name in transposed else src)
    if ours:
        raise RuntimeError(f"parameters with no Hugging Face counterpart: {sorted(ours)}")
    return hf


@torch.no_grad()
def from_hf(hf: PreTrainedModel) -> torch.nn.Module:
    """Our model with the weights of a GPT2LMHeadModel or LlamaForCausalLM (copied, fp32)."""
    model = build_model(model_config(hf.config)).float()
    transposed = _conv1d_weights(hf)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        src = theirs.pop(name)
        p.copy_(src.t() if name in transposed else src)
    if theirs:
        raise RuntimeError(f"Hugging Face parameters with no counterpart here: {sorted(theirs)}")
    return model
