"""The single parameter split: every trainable parameter claimed exactly once, counts per group."""

import pytest
import torch
from torch import nn

from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.groups import GROUPS, split_parameters


@pytest.mark.parametrize("family, expected", [
    # gpt2 tiny, 4 layers: hidden = 4 x (qkv, attn_out, up, down); embedding = wte (tied head) + wpe;
    # gain_bias = 4 x (2 LN x 2 + 4 biases) + ln_f (2)
    ("gpt2", {"hidden": 16, "embedding": 2, "head": 0, "gain_bias": 34}),
    # llama tiny: hidden = 4 x (q, k, v, o, gate, up, down); untied head; gains = 4 x 2 RMSNorm + final
    ("llama", {"hidden": 28, "embedding": 1, "head": 1, "gain_bias": 9}),
])
def test_split_counts(family, expected):
    model = build_model(ModelConfig(family=family, n_kv_head=2 if family == "llama" else None))
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP)
    assert {g: n for g, (n, _) in split.counts().items()} == expected
    total = sum(k for _, k in split.counts().values())
    assert total == sum(p.numel() for p in model.parameters()) == model.num_params()
    claimed = [id(p) for g in GROUPS for p in split.params(g)]
    assert len(claimed) == len(set(claimed)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in split.params("hidden"))


def _toy():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    roles = {"0.weight": "mlp_up", "0.bias": "bias", "1.weight": "norm", "1.bias": "bias"}
    return m, roles


def test_unclaimed_parameter_is_an_error():
    m, roles = _toy()
    del roles["1.weight"]
    with pytest.raises(ValueError, match="1.weight has no declared role"):
        split_parameters(m.named_parameters(), roles, ROLE_GROUP)


def test_stale_role_is_an_error():
    m, roles = _toy()
    roles["2.weight"] = "mlp_down"
    with pytest.raises(ValueError, match="2.weight"):
        split_parameters(m.named_parameters(), roles, ROLE_GROUP)


def test_same_tensor_twice_is_an_error():
    m, roles = _toy()
    dup = [*m.named_parameters(), ("again", m[0].weight)]
    with pytest.raises(ValueError, match="claimed twice"):
        split_parameters(dup, {**roles, "again": "mlp_up"}, ROLE_GROUP)


def test_hidden_role_must_be_a_matrix():
    m, roles = _toy()
    roles["0.bias"] = "mlp_up"
    with pytest.raises(ValueError, match="hidden matrix"):
        split_parameters(m.named_parameters(), roles, ROLE_GROUP)


def test_frozen_parameters_are_skipped():
    m, roles = _toy()
    m[1].weight.requires_grad_(False)
    del roles["1.weight"]
    split = split_parameters(m.named_parameters(), roles, ROLE_GROUP)
    assert split.counts()["gain_bias"] == (2, 8)
    assert torch.equal(split.params("hidden")[0], m[0].weight)
