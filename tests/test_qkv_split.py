"""GPT-2's fused attention projection c_attn = [q; k; v] (3d x d) as three matrices for every matrix method
(optimizers/groups.py: row_blocks, matrix_group): one step at a fixed gradient against fp64 references of
the published updates block by block, the fused ablation equal to the one-matrix step bit for bit, Llama
(separate q/k/v) unchanged, and the blocks of all layers orthogonalized in one batched call."""

import copy
import math

import pytest
import torch

from harness.config.schema import ConfigError
from harness.config.validate import build_optimizer_spec
from models import ROLE_GROUP, ModelConfig, build_model
from optimizers import ortho
from optimizers.groups import matrix_group, row_blocks, split_parameters
from optimizers.muon import MuonSpec, scale_factor
from optimizers.newton_muon import NewtonMuonSpec
from optimizers.normuon import NorMuonSpec
from optimizers.polargrad import PolarGradSpec

D, HEADS, LAYERS = 32, 4, 2
LR, BETA = 0.05, 0.9


def model_and_split(family="gpt2", dtype=torch.float64, **kw):
    cfg = ModelConfig(family=family, n_layer=LAYERS, n_head=HEADS, d_model=D, vocab_size=64, block_size=16, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    return model, split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())


def fixed_gradients(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def polar64(X):
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


def one_step(spec, family="gpt2", **kw):
    """(split, W before, W after) for one step of `spec` from a fixed gradient (fp64 model)."""
    model, split = model_and_split(family, **kw)
    fixed_gradients(model)
    before = {i.name: i.param.detach().clone() for i in split.infos("hidden")}
    spec.build(split).step()
    return split, before, {i.name: i.param.detach().clone() for i in split.infos("hidden")}


def blocks_of(info, layout):
    rows = row_blocks(info.role, tuple(info.param.shape), layout)
    out, start = [], 0
    for r in rows:
        out.append(slice(start, start + r))
        start += r
    return out


def test_row_blocks_of_fused_qkv_and_of_other_matrices():
    assert row_blocks("attn_qkv", (96, 32), {"n_head": 4, "n_kv_head": 4, "head_dim": 8}) == (32, 32, 32)
    assert row_blocks("attn_qkv", (64, 32), {"n_head": 4, "n_kv_head": 2, "head_dim": 8}) == (32, 16, 16)
    assert row_blocks("attn_qkv", (96, 32), {}) == (32, 32, 32)  # no layout: thirds
    assert row_blocks("mlp_up", (128, 32), {"n_head": 4}) == (128,)
    with pytest.raises(ValueError, match="does not split"):
        row_blocks("attn_qkv", (95, 32), {"n_head": 4, "n_kv_head": 4, "head_dim": 8})
    _, split = model_and_split()
    group = matrix_group(split.infos("hidden"), split.layout, "split")
    assert [b for b, i in zip(group["row_blocks"], split.infos("hidden")) if i.role == "attn_qkv"] == [(D,) * 3] * 2
    assert all(len(b) == 1 for b in matrix_group(split.infos("hidden"), split.layout, "fused")["row_blocks"])


@pytest.mark.parametrize("scale", ["keller", "moonlight"])
def test_muon_orthogonalizes_q_k_v_apart(scale):
    # First step, buffer 0: U = lerp(G, (1 - beta) G, beta) is a positive multiple of G, so every block's
    # update is lr * s(block shape) * polar(G_block); the fp64 model and SVD back-end make it exact to ~1e-15.
    spec = MuonSpec(lr=LR, momentum=BETA, backend="svd", dtype="fp64", scale=scale)
    split, before, after = one_step(spec)
    n_blocks = 0
    for info in split.infos("hidden"):
        step = (before[info.name] - after[info.name]) / LR
        for rows in blocks_of(info, split.layout):
            G = info.param.grad[rows]
            ref = scale_factor(G.shape, scale) * polar64(G)
            assert torch.allclose(step[rows], ref, rtol=0, atol=1e-12), (info.name, rows)
            n_blocks += 1
    assert n_blocks == LAYERS * (3 + 3)  # q, k, v, attn_out, mlp_up, mlp_down per layer


def test_split_and_fused_differ_by_about_half():
    # The reason for the default: for Gaussian blocks the stacked matrix's polar factor is far from the
    # stack of the blocks' (measured 0.50-0.55 relative Frobenius at d = 128; here at d = 32, the same size).
    G = torch.randn(3 * 128, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused = polar64(G) * 3 ** 0.5  # Keller's sqrt(max(1, 3d/d)) vs 1 for each d x d block
    split = torch.cat([polar64(b) for b in G.split(128)])
    assert 0.3 < ((fused - split).norm() / split.norm()).item() < 0.8


def test_normuon_normalizes_each_block_and_keeps_its_norm():
    spec = NorMuonSpec(lr=LR, momentum=BETA, beta2=0.95, backend="svd", dtype="fp64")
    split, before, after = one_step(spec)
    for info in split.infos("hidden"):
        step = (before[info.name] - after[info.name]) / LR
        for rows in blocks_of(info, split.layout):
            O = polar64(info.param.grad[rows])
            v = 0.05 * O.square().mean(dim=1, keepdim=True)  # (1 - beta2) r from v = 0 (no bias correction)
            normed = O / (v.sqrt() + 1e-10)
            normed = normed * O.norm() / (normed.norm() + 1e-10)  # each block keeps its own ||O||_F
            ref = scale_factor(O.shape, "keller") * normed
            # NorMuon's normalization runs in fp32 (its v buffer, as the official code): the cast, a row mean
            # and two Frobenius norms (pairwise sums: ~log2(terms) roundings each), a sqrt, three products or
            # quotients; so a relative error of about (2 log2(mn) + 10) fp32 eps of the largest entry.
            tol = (2 * math.log2(O.numel()) + 10) * torch.finfo(torch.float32).eps * ref.abs().max().item()
            assert torch.allclose(step[rows], ref, rtol=0, atol=tol), info.name


@pytest.mark.parametrize("polar_first", [False, True])
def test_polargrad_scales_each_block_by_its_own_nuclear_norm(polar_first):
    spec = PolarGradSpec(lr=LR, momentum=BETA, backend="svd", dtype="fp64", polar_first=polar_first,
                         lr_scale="raw")
    split, before, after = one_step(spec)
    for info in split.infos("hidden"):
        step = (before[info.name] - after[info.name]) / LR
        for rows in blocks_of(info, split.layout):
            G = info.param.grad[rows]
            # momentum-first: M = (1 - beta) G, step ||M||_* polar(M); polar-first: M = (1 - beta) polar(G),
            # step ||G||_* M. On the first step both are (1 - beta) ||G_block||_* polar(G_block).
            ref = (1 - BETA) * torch.linalg.svdvals(G).sum() * polar64(G)
            # fp64 SVDs on both sides (backward stable: errors of O(n) fp64 eps of the largest entry, ~2e-15
            # measured); 1e-12 of the largest entry leaves room for any LAPACK, and no room for a wrong scale
            assert torch.allclose(step[rows], ref, rtol=0, atol=1e-12 * ref.abs().max().item()), info.name


@pytest.mark.parametrize("spec_cls", [MuonSpec, NorMuonSpec, NewtonMuonSpec, PolarGradSpec])
def test_fused_option_is_the_one_matrix_step(spec_cls):
    # qkv=fused must be the old step exactly: each parameter one matrix. Compared with a group that carries
    # no row_blocks at all (the optimizers' one-matrix path), in fp32 with the default back-end, bit for bit.
    kw = {"dtype": "fp32", **({"lr_scale": "raw"} if spec_cls is PolarGradSpec else {})}  # c: one per model
    model, split = model_and_split(dtype=torch.float32)
    fixed_gradients(model)
    twin = copy.deepcopy(model)
    fixed_gradients(twin)
    fused = spec_cls(qkv="fused", **kw).build(split)
    fused.step()
    twin_split = split_parameters(twin.named_parameters(), twin.param_roles(), ROLE_GROUP, twin.attn_layout())
    plain = spec_cls(qkv="fused", **kw).build(twin_split)
    for g in plain.optimizers[0].param_groups:
        g.pop("row_blocks")
    plain.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    # ... and the split default moves c_attn differently; the other matrices alike up to rounding (their
    # batched calls hold other matrices now: a few ulps of the weight at most)
    model2, split2 = model_and_split(dtype=torch.float32)
    fixed_gradients(model2)
    spec_cls(**kw).build(split2).step()
    for (name, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        ulps = 8 * torch.finfo(torch.float32).eps * a.abs().max().item()
        assert torch.allclose(a, b, rtol=0, atol=ulps) != ("c_attn.weight" in name), name


@pytest.mark.parametrize("spec_cls", [MuonSpec, NorMuonSpec, NewtonMuonSpec, PolarGradSpec])
def test_llama_has_separate_qkv_and_does_not_change(spec_cls):
    results = []
    for qkv in ("split", "fused"):
        model, split = model_and_split("llama", dtype=torch.float32, n_kv_head=2)
        assert "attn_qkv" not in {i.role for i in split.infos("hidden")}
        fixed_gradients(model)
        opt = spec_cls(qkv=qkv, dtype="fp32").build(split)
        assert all(len(b) == 1 for g in opt.optimizers[0].param_groups for b in g["row_blocks"])
        opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_blocks_of_every_layer_go_in_one_batched_call(monkeypatch):
    shapes = []
    real = ortho.orthogonalize
    monkeypatch.setattr(ortho, "orthogonalize", lambda G, *a, **k: shapes.append(tuple(G.shape)) or real(G, *a, **k))
    model, split = model_and_split(dtype=torch.float32)
    fixed_gradients(model)
    MuonSpec(dtype="fp32").build(split).step()
    # q, k, v and attn_out of both layers: one (8, d, d) call; mlp_up, mlp_down: one call each
    assert sorted(shapes) == sorted([(LAYERS * 4, D, D), (LAYERS, 4 * D, D), (LAYERS, D, 4 * D)])


def test_qkv_value_is_checked_with_its_key():
    with pytest.raises(ConfigError, match=r"optimizer\.qkv: 'stacked' is not one of split, fused"):
        build_optimizer_spec({"_target_": "optimizers.muon.MuonSpec", "qkv": "stacked"})
    with pytest.raises(ConfigError, match=r"optimizer\.qkv"):
        build_optimizer_spec({"_target_": "optimizers.polargrad.PolarGradSpec", "qkv": "x"})
