"""Adam-mini against its reference maths (optimizers.md 4.2-4.3, check 8.7) on a hand-made example, on the
tiny GPT-2 (fused QKV) and the tiny Llama with grouped-query attention: the number of second-moment scalars,
the measured state size vs AdamW, AdamW exactly when every entry is a block, loss, save/load, seed."""

import copy
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_muon import gaussian, train

from harness.config import ConfigError, build_optimizer_spec
from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.adam_mini import AdamMini, AdamMiniSpec, adam_mini_update, partition
from optimizers.adamw import AdamWSpec
from optimizers.groups import GROUPS, split_parameters

REPO = Path(__file__).resolve().parent.parent
MODELS = {"gpt2": ModelConfig(), "llama": ModelConfig(family="llama", n_kv_head=2)}  # = conf/model/*_tiny.yaml


def tiny(family="gpt2", seed=0, layout=True):
    """A tiny model and its parameter split (with the attention layout unless layout=False)."""
    torch.manual_seed(seed)
    model = build_model(MODELS[family])
    return model, split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP,
                                   model.attn_layout() if layout else None)


def tiny_problem(spec, family="gpt2", seed=0):
    """As tests/test_muon.py's tiny_problem (one fixed 4 x 64 batch), with the layout Adam-mini needs."""
    model, split = tiny(family, seed)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 4096, (4, 64), generator=g) for _ in range(2))
    return model, spec.build(split), (x, y)


def expected_v_scalars(cfg):
    """Second-moment scalars of the v1.1 partition, counted from the config alone."""
    d, f, h, kv, hd = cfg.d_model, cfg.ffn_dim, cfg.n_head, cfg.kv_heads, cfg.head_dim
    if cfg.family == "gpt2":
        # c_attn: q and k per head, v per row; attn c_proj, c_fc, mlp c_proj per row; ln_1, ln_2 gains one
        # each; biases per element (c_attn 3d, attn c_proj d, c_fc f, mlp c_proj d, ln_1 and ln_2 d each)
        layer = (2 * h + d) + d + f + d + 2 + (3 * d + d + f + d + 2 * d)
        # wte (also the head) and wpe per row; ln_f gain one, ln_f bias per element
        return cfg.n_layer * layer + cfg.vocab_size + cfg.block_size + 1 + d
    # q per head, k per kv head, v rows (kv heads x head_dim), o, gate, up, down per row, two RMSNorm gains
    layer = h + kv + kv * hd + d + f + f + d + 2
    return cfg.n_layer * layer + cfg.vocab_size + cfg.vocab_size + 1  # embed rows, untied head rows, final norm


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def one_step(model, opt):
    g = torch.Generator().manual_seed(1)
    train(model, opt, [torch.randint(0, 4096, (2, 32), generator=g) for _ in range(2)], 1)


@pytest.mark.parametrize("family, count", [("gpt2", 13_737), ("llama", 13_601)])
def test_second_moment_scalars_match_the_partition(family, count):
    cfg = MODELS[family]
    assert cfg.family != "llama" or cfg.kv_heads < cfg.n_head  # GQA: k has fewer heads than q
    model, split = tiny(family)
    opt = AdamMiniSpec().build(split)
    one_step(model, opt)
    assert sum(s["v"].numel() for s in opt.state.values()) == expected_v_scalars(cfg) == count
    assert all(s["m"].shape == p.shape for p, s in opt.state.items())  # the first moment stays full


@pytest.mark.parametrize("family, ratio", [("gpt2", 0.50508), ("llama", 0.50334)])
def test_state_is_about_half_of_adamw_measured(family, ratio):
    # Bytes of the tensors held in optimizer.state after one step; AdamW also keeps a 4-byte step per tensor.
    # The bound is the 0.51; per-element bias states (GPT-2: 5,760 of 1.35M params) are in the ratio.
    model, split = tiny(family)
    ours = AdamMiniSpec().build(split)
    model_w, split_w = tiny(family)
    adamw = AdamWSpec().build(split_w)
    one_step(model, ours)
    one_step(model_w, adamw)
    measured = state_bytes(ours) / state_bytes(adamw)
    assert measured <= 0.51 and measured == pytest.approx(ratio, abs=1e-5)


def test_one_block_per_element_is_adamw():
    # The tiny GPT-2's tensors and groups (decay on matrices and embeddings, none on gains/biases), 5 steps of
    # fixed random gradients. adam_mini_update runs torch's single-tensor AdamW operations in the same order;
    # the one difference: torch's CPU addcmul (v + (1 - beta2) g g) is a fused multiply-add, one rounding,
    # where ours rounds (1 - beta2) g g before adding. So step 1 (v = 0) is bit-identical, later v entries differ
    # by ~1 ulp per step; measured: weights within 1.5e-8 after 5 steps, v within 3.1e-7 relative. (Gradients of
    # the model itself would feed these ulps back and Adam amplifies them where g ~ 0, hence fixed gradients.)
    def groups(split):
        return [{"params": split.params(g), "roles": [i.role for i in split.infos(g)],
                 "weight_decay": 0.0 if g == "gain_bias" else 0.1} for g in GROUPS if split.groups[g]]

    (model, split), (ref_model, ref_split) = tiny(), tiny()
    opt = AdamMini(groups(split), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, granularity="element")
    ref = torch.optim.AdamW(groups(ref_split), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    pairs = list(zip(model.parameters(), ref_model.parameters()))
    for t in range(5):
        for i, (p, q) in enumerate(pairs):
            p.grad = gaussian(*p.shape, seed=100 * t + i)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        if t == 0:
            assert all(torch.equal(p, q) for p, q in pairs)
    for p, q in pairs:
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["m"], ref.state[q]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["v"], ref.state[q]["exp_avg_sq"].flatten(), rtol=1e-6, atol=0)


def test_update_against_the_equations():
    # optimizers.md 4.2 written out with explicit row ranges: a 4 x 6 query of 2 heads (head_dim 2) and a fused
    # 12 x 6 [q; k; v] of the same layout (2 q heads, 2 k heads, 4 v rows). Small gradients and eps 1e-4 make
    # eps's place (outside the bias-corrected sqrt) visible.
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.95), 1e-4, 0.1
    layout = {"n_head": 2, "n_kv_head": 2, "head_dim": 2}
    rows = {"attn_q": [(0, 2), (2, 4)], "attn_qkv": [(0, 2), (2, 4), (4, 6), (6, 8), *((r, r + 1) for r in range(8, 12))]}
    W0 = {"attn_q": gaussian(4, 6, dtype=torch.float64), "attn_qkv": gaussian(12, 6, seed=1, dtype=torch.float64)}
    params = [torch.nn.Parameter(W0[r].clone()) for r in rows]
    opt = AdamMini([{"params": params, "roles": list(rows)}], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                   layout=layout)
    for t in range(1, 4):
        for p in params:
            p.grad = 1e-3 * gaussian(*p.shape, seed=10 * t, dtype=torch.float64)
        opt.step()
    for role, p in zip(rows, params):
        W, m, v = W0[role].clone(), torch.zeros_like(W0[role]), [0.0] * len(rows[role])
        for t in range(1, 4):
            G = 1e-3 * gaussian(*W.shape, seed=10 * t, dtype=torch.float64)
            W = W * (1 - lr * wd)
            m = b1 * m + (1 - b1) * G
            for b, (i, j) in enumerate(rows[role]):
                v[b] = b2 * v[b] + (1 - b2) * G[i:j].square().mean().item()
                W[i:j] -= lr * (m[i:j] / (1 - b1**t)) / (math.sqrt(v[b] / (1 - b2**t)) + eps)
        torch.testing.assert_close(p.detach(), W, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[p]["m"], m, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[p]["v"], torch.tensor(v, dtype=torch.float64), rtol=1e-12, atol=0)


def test_pure_update_is_what_step_applies():
    blocks = partition("attn_qkv", (12, 6), {"n_head": 2, "n_kv_head": 2, "head_dim": 2})
    W = torch.nn.Parameter(gaussian(12, 6))
    ref, m, v = W.detach().clone(), torch.zeros(12, 6), torch.zeros(8)
    opt = AdamMini([{"params": [W], "roles": ["attn_qkv"]}], layout={"n_head": 2, "n_kv_head": 2, "head_dim": 2})
    for t in range(1, 4):
        W.grad = gaussian(12, 6, seed=t)
        opt.step()
        adam_mini_update(ref, W.grad, m, v, blocks=blocks, step=t, lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                         weight_decay=0.1)
        assert torch.equal(W.detach(), ref) and torch.equal(opt.state[W]["v"], v)


@pytest.mark.parametrize("role, shape, layout, blocks", [
    ("attn_qkv", (24, 8), {"n_head": 2, "n_kv_head": 2, "head_dim": 4}, ((2, 4), (2, 4), (8, 1))),
    ("attn_qkv", (16, 8), {"n_head": 4, "n_kv_head": 2, "head_dim": 2}, ((4, 2), (2, 2), (4, 1))),  # fused GQA
    ("attn_q", (128, 128), {"n_head": 4, "n_kv_head": 2, "head_dim": 32}, ((4, 32),)),
    ("attn_k", (64, 128), {"n_head": 4, "n_kv_head": 2, "head_dim": 32}, ((2, 32),)),
    ("attn_v", (64, 128), {}, ((64, 1),)),
    ("mlp_gate", (512, 128), {}, ((512, 1),)),
    ("head", (4096, 128), {}, ((4096, 1),)),
    ("pos_embed", (256, 128), {}, ((256, 1),)),
    ("bias", (384,), {}, ((384, 1),)),
    ("norm", (128,), {}, ((1, 1),)),
    ("pc_gain", (), {}, ((1, 1),)),  # any other role: one scalar for the tensor
])
def test_partition_by_role(role, shape, layout, blocks):
    assert partition(role, shape, layout) == blocks
    numel = math.prod(shape)
    assert partition(role, shape, layout, granularity="element") == ((numel, 1),)


def test_unsupported_layouts_are_errors():
    with pytest.raises(ValueError, match=r"'attn_q' has 10 rows, not 4 heads x head_dim 2 = 8"):
        partition("attn_q", (10, 6), {"n_head": 4, "n_kv_head": 4, "head_dim": 2})
    with pytest.raises(ValueError, match=r"'attn_qkv' has 24 rows, not \[q; k; v\]"):
        partition("attn_qkv", (24, 8), {"n_head": 4, "n_kv_head": 4, "head_dim": 4})
    with pytest.raises(ValueError, match="'mlp_up' is a matrix but has shape"):
        partition("mlp_up", (8,), {})
    with pytest.raises(ValueError, match=r"'attn_qkv' is split per head and needs .* \['n_head'"):
        AdamMiniSpec().build(tiny(layout=False)[1])  # a split built without model.attn_layout()
    with pytest.raises(ValueError, match="needs 'roles'"):
        AdamMini([torch.nn.Parameter(torch.zeros(3))])


def test_build_prints_the_partition_and_keeps_group_lrs(capsys):
    model, opt, batch = tiny_problem(AdamMiniSpec())
    out = capsys.readouterr().out
    assert "attn_qkv   q,k per head; v per row        4        196,608         544" in out
    assert "total" in out and "1,350,400      13,737" in out
    assert [(g["group"], g["weight_decay"]) for g in opt.param_groups] == [
        ("hidden", 0.1), ("embedding", 0.1), ("gain_bias", 0.0)]  # GPT-2's head is the tied embedding
    opt.param_groups[2]["lr"] = 0.0  # what the harness's schedule writes, per group
    before = [p.detach().clone() for p in opt.param_groups[2]["params"]]
    train(model, opt, batch, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[2]["params"]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lowers_the_loss(family):
    losses = train(*tiny_problem(AdamMiniSpec(), family), 8)
    # memorizing one batch from ln(4096) = 8.32: measured 5.56 (gpt2) / 6.16 (llama) after 8 steps
    assert losses[0] == pytest.approx(8.34, abs=0.05) and losses[-1] < 6.5


def test_state_round_trip():
    model, opt, batch = tiny_problem(AdamMiniSpec(), "llama")
    train(model, opt, batch, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batch, 1)
    model2, opt2, _ = tiny_problem(AdamMiniSpec(), "llama", seed=1)  # other weights, overwritten below
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batch, 1)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_same_seed_same_result():
    (m1, o1, b1), (m2, o2, b2) = tiny_problem(AdamMiniSpec()), tiny_problem(AdamMiniSpec())
    assert train(m1, o1, b1, 3) == train(m2, o2, b2, 3)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def test_config_is_typed_and_checked():
    spec = build_optimizer_spec(OmegaConf.load(REPO / "conf" / "optimizer" / "adam_mini.yaml"))
    assert spec == AdamMiniSpec()
    target = {"_target_": "optimizers.adam_mini.AdamMiniSpec"}
    for override, message in [({"lr": 0}, "optimizer.lr: must be > 0"), ({"betas": [0.9]}, "optimizer.betas"),
                              ({"eps": 0.0}, "optimizer.eps: must be > 0"),
                              ({"weight_decay": -1.0}, "optimizer.weight_decay: must be >= 0"),
                              ({"granularity": "element"}, "optimizer.granularity")]:
        with pytest.raises(ConfigError, match=message):
            build_optimizer_spec({**target, **override})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    # Same maths on CUDA: state on the parameter's device; reductions order differently, hence the tolerance.
    blocks = partition("attn_qkv", (384, 128), {"n_head": 4, "n_kv_head": 4, "head_dim": 32})
    p, m, v = gaussian(384, 128), torch.zeros(384, 128), torch.zeros(136)
    gp, gm, gv = p.cuda(), m.cuda(), v.cuda()
    for t in range(1, 4):
        G = gaussian(384, 128, seed=t)
        kw = {"blocks": blocks, "step": t, "lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
        adam_mini_update(p, G, m, v, **kw)
        adam_mini_update(gp, G.cuda(), gm, gv, **kw)
    torch.testing.assert_close(gp.cpu(), p, rtol=0, atol=1e-6)
    torch.testing.assert_close(gv.cpu(), v, rtol=1e-5, atol=0)
    model, opt, batch = tiny_problem(AdamMiniSpec(), "llama")
    model.cuda()
    losses = train(model, opt, [t.cuda() for t in batch], 5)
    assert losses[-1] < losses[0] and all(s["v"].is_cuda for s in opt.state.values())
