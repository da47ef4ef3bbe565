"""The shared hybrid group (protocol v2, optimizers/hybrid.py build_optimizer): every optimizer owns only the
hidden matrices, one AdamW with the shared settings owns the rest, and nothing else changes."""

import pytest
import torch

from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.adam_mini import AdamMiniSpec
from optimizers.adamw import AdamWSpec
from optimizers.groups import split_parameters
from optimizers.hybrid import SharedGroup, build_optimizer
from optimizers.lion import LionSpec
from optimizers.muon import MuonSpec
from optimizers.soap import SOAPSpec

SHARED = SharedGroup(enabled=True, lr=2e-3, betas=[0.9, 0.99], weight_decay=0.05)


def model_and_split():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, block_size=16))
    return model, split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())


def steps(model, opt, n=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        x = torch.randint(0, 64, (4, 17), generator=gen)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("spec", [AdamWSpec(), MuonSpec(), AdamMiniSpec(), LionSpec(), SOAPSpec()],
                         ids=["adamw", "muon", "adam_mini", "lion", "soap"])
def test_the_arm_owns_the_hidden_matrices_and_the_shared_adamw_the_rest(spec):
    model, split = model_and_split()
    opt = build_optimizer(spec, split, SHARED)
    hidden = {id(p) for p in split.params("hidden")}
    shared = [g for g in opt.param_groups if any(id(p) not in hidden for p in g["params"])]
    assert shared and all(id(p) not in hidden for g in shared for p in g["params"])
    assert {id(p) for g in shared for p in g["params"]} == {id(p) for p in model.parameters()} - hidden
    for g in shared:  # the shared settings, decay only on embeddings and head
        assert (g["lr"], tuple(g["betas"])) == (2e-3, (0.9, 0.99))
        assert g["weight_decay"] == (0.05 if g["group"] in ("embedding", "head") else 0.0)
    assert type(opt.optimizers[1]) is torch.optim.AdamW


def test_off_builds_each_optimizer_as_declared():
    _, split = model_and_split()
    assert type(build_optimizer(AdamWSpec(), split, SharedGroup())) is torch.optim.AdamW


def test_muon_with_the_shared_group_equals_muon_with_that_aux_bit_for_bit():
    m1, s1 = model_and_split()
    a = steps(m1, build_optimizer(MuonSpec(), s1, SHARED))
    m2, s2 = model_and_split()
    aux = AdamWSpec(lr=2e-3, betas=[0.9, 0.99], weight_decay=0.05, decay_groups=["embedding", "head"])
    b = steps(m2, MuonSpec(aux=aux).build(s2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_adamw_arm_with_equal_shared_settings_is_whole_model_adamw():
    """The AdamW arm in hybrid form (hidden AdamW + shared AdamW, equal settings) = one AdamW, bit for bit."""
    m1, s1 = model_and_split()
    a = steps(m1, build_optimizer(AdamWSpec(lr=2e-3, betas=[0.9, 0.99], weight_decay=0.05), s1, SHARED))
    m2, s2 = model_and_split()
    b = steps(m2, AdamWSpec(lr=2e-3, betas=[0.9, 0.99], weight_decay=0.05).build(s2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_shared_group_never_decays_hidden():
    with pytest.raises(ValueError, match="hybrid.decay_groups: the shared group does not own the hidden"):
        SharedGroup(enabled=True, decay_groups=["hidden"]).validate()
