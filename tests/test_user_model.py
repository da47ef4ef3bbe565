"""A user's own model by `_target_` (models/__init__.py: the interface): a 2-layer MLP language model kept in a
file outside the repository trains through the harness's own path (prepare_run, train) with Muon and AdamW, its
parameters through the one split; a class lacking a piece of the interface is refused in one line naming it,
right after construction, before the optimizer exists.

    .venv/bin/python -m pytest tests/test_user_model.py -q
"""

import json
import math

import pytest
import yaml
from hydra import compose, initialize_config_dir

from harness.config import search
from harness.config.schema import ConfigError, register_configs
from harness.lifecycle.prepare import SetupError, prepare_run
from train import train

MODEL_CODE = '''"""A user's language model without attention: embedding, residual MLP blocks, norm, untied head."""
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, d, h = cfg, cfg.d_model, cfg.options["hidden"]
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.ups = nn.ModuleList(nn.Linear(d, h, bias=False) for _ in range(cfg.n_layer))
        self.downs = nn.ModuleList(nn.Linear(h, d, bias=False) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=cfg.init_std)

    def param_roles(self):
        roles = {"embed.weight": "embed", "norm.weight": "norm", "norm.bias": "bias", "head.weight": "head"}
        for i in range(self.cfg.n_layer):
            roles.update({f"ups.{i}.weight": "mlp_up", f"downs.{i}.weight": "mlp_down"})
        return roles

    def num_params(self, non_embedding=False):
        return sum(p.numel() for n, p in self.named_parameters() if not (non_embedding and n == "embed.weight"))

    def flops_per_token(self, seq_len):
        return 6.0 * (self.num_params(non_embedding=True) - 2 * self.cfg.d_model)  # matmul weights only

    def forward(self, idx, targets=None):
        x = self.embed(idx)  # (B, T, d)
        for up, down in zip(self.ups, self.downs):
            x = x + down(F.gelu(up(x)))
        logits = self.head(self.norm(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


class NoRoles(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, idx, targets=None):
        return None, None

    def num_params(self, non_embedding=False):
        return 20

    def flops_per_token(self, seq_len):
        return 1.0


class GroupAsRole(TinyMLP):
    def param_roles(self):
        return {**super().param_roles(), "ups.0.weight": "hidden"}  # a group's name, not a role


class NoLoss(TinyMLP):
    def forward(self, idx, targets=None):
        return super().forward(idx)[0]


class AttentionWithoutLayout(TinyMLP):
    def param_roles(self):
        return {**super().param_roles(), "ups.0.weight": "attn_q"}  # per head for Adam-mini; no attn_layout()
'''
D, H, V, LAYERS = 32, 64, 4096, 2
N_PARAMS = V * D + LAYERS * 2 * D * H + 2 * D + D * V  # embedding, MLPs, norm gain and bias, head


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    d = tmp_path_factory.mktemp("home") / "my_conf"
    (d / "model").mkdir(parents=True)
    (d / "optbench_user_mlp.py").write_text(MODEL_CODE)
    (d / "model" / "tiny_mlp.yaml").write_text(yaml.safe_dump(
        {"_target_": "optbench_user_mlp.TinyMLP", "family": "tiny_mlp", "n_layer": LAYERS, "d_model": D,
         "vocab_size": V, "block_size": 64, "options": {"hidden": H}}))
    return d


@pytest.fixture
def composed(user, monkeypatch):
    monkeypatch.setenv(search.ENV, str(user))
    register_configs()

    def compose_with(*overrides):
        with initialize_config_dir(config_dir=str(search.CONF), version_base="1.3", job_name="test"):
            return compose("config", overrides=search.with_user_dirs(
                ["experiment=smoke", "model=tiny_mlp", "logger=none", "name=test", "train.threads=1",
                 "train.max_steps=3", "train.eval_every=3", "train.eval_dense_frac=0", *overrides]))
    return compose_with


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_user_model_trains_through_the_one_split(composed, kjv_dir, tmp_path, optimizer):
    run = prepare_run(composed(f"optimizer={optimizer}"), tmp_path / "run")
    assert type(run.model).__name__ == "TinyMLP" and run.split.layout == {}  # no attention: no layout
    assert run.split.counts() == {"hidden": (2 * LAYERS, 2 * LAYERS * D * H), "embedding": (1, V * D),
                                  "head": (1, D * V), "gain_bias": (2, 2 * D)}
    summary = train(run)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert summary["steps"] == 3 and not summary["diverged"] and all(math.isfinite(v) for v in val)
    assert val[-1] < val[0] - 1e-3  # step 0 (about ln V = 8.3) to step 3
    assert summary["n_params"] == N_PARAMS == sum(p.numel() for p in run.model.parameters())
    assert summary["flops_per_token"] == 6.0 * (N_PARAMS - V * D - 2 * D)


@pytest.mark.parametrize("target, message", [
    ("NoRoles", ("model._target_: optbench_user_mlp.NoRoles lacks param_roles() (the model interface: "
                 "models/__init__.py)")),
    ("GroupAsRole", ("model._target_: optbench_user_mlp.GroupAsRole: parameter ups.0.weight has role 'hidden', "
                     "not one of models.config.ROLES (embed, pos_embed, head, attn_qkv, attn_q, attn_k, attn_v, "
                     "attn_out, mlp_up, mlp_gate, mlp_down, norm, bias, pc_gain)")),
    ("NoLoss", ("model._target_: optbench_user_mlp.NoLoss: forward(idx, targets) must return (logits, loss), "
                "loss a 0-dim float tensor; got a Tensor")),
    ("Missing", ("model._target_: cannot import 'optbench_user_mlp.Missing' (AttributeError: module "
                 "'optbench_user_mlp' has no attribute 'Missing'; a directory of OPTBENCH_CONFIG_PATH is "
                 "importable)")),
])
def test_a_missing_piece_is_one_line_before_the_optimizer(composed, kjv_dir, tmp_path, target, message):
    with pytest.raises((ConfigError, SetupError)) as e:  # what train.py's main prints as one line, exit 2
        prepare_run(composed("optimizer=adamw", f"model._target_=optbench_user_mlp.{target}"), tmp_path / "run")
    assert str(e.value) == message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written


def test_adam_mini_runs_without_a_layout_and_refuses_per_head_roles_without_one(composed, kjv_dir, tmp_path):
    run = prepare_run(composed("optimizer=adam_mini"), tmp_path / "mlp")  # no attention roles: per-row blocks
    run.lock.release(remove=True)
    # a SetupError: what train.py's main prints as one line (exit 2), no traceback
    with pytest.raises(SetupError, match="^optimizer: Adam-mini: role 'attn_q' is split per head and needs the "
                                         "model's attention layout"):
        prepare_run(composed("optimizer=adam_mini", "model._target_=optbench_user_mlp.AttentionWithoutLayout"),
                    tmp_path / "attn")
