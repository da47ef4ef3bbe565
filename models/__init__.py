"""Language models under test and the parameter roles optimizers group them by.

    config.py  ModelConfig (the schema of conf/model/*.yaml) and the parameter roles, ROLE_GROUP
    base.py    CausalLM: roles declared where layers are built, initialisation, parameter counts, FLOPs,
               the fused linear cross-entropy head
    gpt2.py    GPT-2 (nanoGPT's layout: fused c_attn, GELU MLP, LayerNorm, tied head)
    llama.py   Llama (RMSNorm, rotary embeddings, SwiGLU, separate q/k/v, untied head)
    pc.py      the PC layer (polynomial weight preconditioning) and its merge into plain weights
    hf.py      conversion to and from Hugging Face transformers

    python -c "from models import ModelConfig, build_model; m = build_model(ModelConfig()); print(m.num_params())"

A user's own model: a model YAML with `_target_: my_models.TinyMLP` (module.Class, importable: e.g. a file in
a directory of OPTBENCH_CONFIG_PATH, harness/config/search.py) and a `family` label is built as
`TinyMLP(cfg)`, cfg the run's ModelConfig: its standard fields (d_model, n_layer, vocab_size, block_size,
init_std, ...) and `cfg.options`, a free-form dict only that class reads. `build_model` checks the instance
right after construction, before any optimizer or training step (`check_model`), so a missing piece is one
line naming it. What the harness calls on a model (LanguageModel below):

    forward(idx, targets=None) -> (logits | None, loss)     idx, targets (B, T) token ids; with targets, the
                                                           mean next-token loss as a 0-dim float tensor
    param_roles() -> {parameter name: role}                 every trainable parameter once, each role one of
                                                           models.config.ROLES (its group: ROLE_GROUP); a
                                                           "hidden" role only on 2-D weights
    num_params(non_embedding=False) -> int                  the records' n_params (banner, summary.json)
    flops_per_token(seq_len) -> float                       training FLOPs per token, for MFU
  optional; a class without one gets this default on the instance:
    attn_layout() -> {"n_head", "n_kv_head", "head_dim"}    {}: no layout. Adam-mini then refuses the per-head
                                                           roles (attn_q, attn_k, attn_qkv), naming the layout
                                                           it lacks; every other role and optimizer runs
    after_optimizer_step()                                  nothing (PC layers refresh their estimate here)
    pc_flops_per_forward() -> float                         0.0 (model.pc_level > 0 needs PC layers: build the
                                                           matrices with models.base.linear)

Subclassing models.base.CausalLM gives all but forward (roles declared with models.base.declare). The
parameters go through the one split (optimizers/groups.py split_parameters) like the built-in families'.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Protocol

import torch
from torch import nn

from models.config import ROLE_GROUP, ROLES, ModelConfig
from models.gpt2 import GPT2
from models.llama import Llama
from models.pc import pc_layers

FAMILY_CLASSES = {"gpt2": GPT2, "llama": Llama}

__all__ = ["GPT2", "ROLES", "ROLE_GROUP", "LanguageModel", "Llama", "ModelConfig", "build_model",
           "check_model", "model_class"]


class LanguageModel(Protocol):
    """The methods every model must have (module docstring: what each returns; the optional ones below)."""

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[Any, Any]: ...

    def param_roles(self) -> dict[str, str]: ...

    def num_params(self, non_embedding: bool = False) -> int: ...

    def flops_per_token(self, seq_len: int) -> float: ...


REQUIRED = ("forward", "param_roles", "num_params", "flops_per_token")


def _no_layout() -> dict[str, int]:
    return {}


def _nothing() -> None:
    return None


def _no_pc_flops() -> float:
    return 0.0


OPTIONAL = {"attn_layout": _no_layout, "after_optimizer_step": _nothing, "pc_flops_per_forward": _no_pc_flops}


def model_class(target: str) -> type[nn.Module]:
    """The class `target` (module.Class) names; ValueError (one line) unless it imports and is an nn.Module."""
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model._target_: cannot import {target!r} ({e.__class__.__name__}: {e}; a directory "
                         "of OPTBENCH_CONFIG_PATH is importable)") from None
    except Exception as e:  # noqa: BLE001 - the user's module fails while it imports
        raise ValueError(f"model._target_: importing {target!r} raises {e.__class__.__name__}: {e}") from None
    if cls is None:
        raise ValueError(f"model._target_: {target!r} is not module.Class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model._target_: {target} is not a torch.nn.Module class")  # noqa: TRY004 - config
    return cls


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate `cfg` and build its model (the family's, or the class of `cfg._target_`), initialised on the
    current default device and checked against the interface (check_model)."""
    cfg.validate()
    if cfg._target_ is None:
        model = FAMILY_CLASSES[cfg.family](cfg)
    else:
        cls = model_class(cfg._target_)
        try:
            model = cls(cfg)
        except Exception as e:  # noqa: BLE001 - the user's constructor: one line naming the class
            raise ValueError(f"model._target_: {cfg._target_}(cfg) raises {e.__class__.__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        for method, default in OPTIONAL.items():
            if not callable(getattr(model, method, None)):
                setattr(model, method, default)
    check_model(model, cfg)
    return model


def check_model(model: nn.Module, cfg: ModelConfig) -> None:
    """Raise ValueError("model._target_: <class>: ...") for the first piece of the interface (module
    docstring) `model` lacks: a required method, a role for every trainable parameter from ROLES, 2-D hidden
    weights, positive counts, and a forward that returns (logits, loss) on a (1, 2) batch (not run on the meta
    device). That forward runs in eval mode (no dropout) without gradients: the built-in models' draws nothing
    from the RNG and changes no state."""
    where = f"model._target_: {cfg._target_}" if cfg._target_ else f"model.family: {cfg.family}"
    missing = [m for m in REQUIRED if not callable(getattr(model, m, None))
               or (m == "forward" and type(model).forward is nn.Module.forward)]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(f'{m}()' for m in missing)} (the model interface: "
                         "models/__init__.py)")
    roles = model.param_roles()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in trainable.items():
        role = roles.get(name)
        if role is None:
            raise ValueError(f"{where}: param_roles() gives parameter {name} no role")
        if role not in ROLE_GROUP:
            raise ValueError(f"{where}: parameter {name} has role {role!r}, not one of models.config.ROLES "
                             f"({', '.join(ROLES)})")
        if ROLE_GROUP[role] == "hidden" and p.ndim != 2:
            raise ValueError(f"{where}: parameter {name} has the hidden-matrix role {role!r} but shape "
                             f"{tuple(p.shape)}; matrix methods need 2-D weights")
    if stale := sorted(set(roles) - set(trainable)):
        raise ValueError(f"{where}: param_roles() names {stale[0]}, not a trainable parameter")
    n, flops = model.num_params(), model.flops_per_token(cfg.block_size)
    if not (isinstance(n, int) and n > 0 and isinstance(flops, (int, float)) and 0 < flops < math.inf):
        raise ValueError(f"{where}: num_params() = {n!r} and flops_per_token() = {flops!r} must be > 0")
    if cfg.pc_level and not pc_layers(model):
        raise ValueError(f"model.pc_level: {cfg.pc_level}, but {cfg._target_ or cfg.family} builds no PC "
                         "layer (build its matrices with models.base.linear)")
    first = next(iter(trainable.values()), None)
    if first is None or first.is_meta:
        return
    idx = torch.zeros((1, min(2, cfg.block_size)), dtype=torch.long, device=first.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(idx, idx)
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises, in one line
        raise ValueError(f"{where}: forward(idx, targets) on a {tuple(idx.shape)} batch raises "
                         f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        model.train(was_training)
    loss = out[1] if isinstance(out, tuple) and len(out) == 2 else None
    if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point()):
        parts = ", ".join(type(o).__name__ for o in out) if isinstance(out, tuple) else None
        got = f"({parts})" if parts is not None else f"a {type(out).__name__}"
        raise ValueError(f"{where}: forward(idx, targets) must return (logits, loss), loss a 0-dim float "
                         f"tensor; got {got}")
