"""Language models under test and the parameter roles optimizers group them by.

    config.py  ModelConfig (the schema of conf/model/*.yaml) and the parameter roles, ROLE_GROUP
    base.py    CausalLM: roles declared where layers are built, initialisation, parameter counts, FLOPs,
               the fused linear cross-entropy head
    gpt2.py    GPT-2 (nanoGPT's layout: fused c_attn, GELU MLP, LayerNorm, tied head)
    llama.py   Llama (RMSNorm, rotary embeddings, SwiGLU, separate q/k/v, untied head)
    pc.py      the PC layer (polynomial weight preconditioning) and its merge into plain weights
    hf.py      conversion to and from Hugging Face transformers

    python -c "from models import ModelConfig, build_model; m = build_model(ModelConfig()); print(m.num_params())"
"""

from torch import nn

from models.config import ROLE_GROUP, ROLES, ModelConfig
from models.gpt2 import GPT2
from models.llama import Llama

FAMILY_CLASSES = {"gpt2": GPT2, "llama": Llama}

__all__ = ["GPT2", "ROLES", "ROLE_GROUP", "Llama", "ModelConfig", "build_model"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Validate `cfg` and build its family's model, initialised on the current default device."""
    cfg.validate()
    return FAMILY_CLASSES[cfg.family](cfg)
