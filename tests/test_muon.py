"""Muon against its reference maths (optimizers.md 1.2-1.6 and checks 8.2-8.4) and through the Hybrid on the
tiny GPT-2: it lowers the loss, its state survives save/load bit for bit, and a seed fixes the result.

`tiny_problem` and `train` are shared with tests/test_normuon.py."""

import copy
import math

import pytest
import torch

from harness.config import ConfigError, build_optimizer_spec
from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.groups import split_parameters
from optimizers.hybrid import Hybrid
from optimizers.muon import Muon, MuonSpec, momentum_direction, muon_update
from optimizers.ortho import orthogonalize


def gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rms(X):
    return X.square().mean().sqrt().item()


@pytest.mark.parametrize("m, n", [(256, 64), (64, 256), (128, 128)])
def test_update_rms_per_scale_convention(m, n):
    # optimizers.md 8.2: exact polar factor (svd) of a full-rank m x n matrix has RMS 1/sqrt(max(m, n)).
    G = gaussian(m, n, dtype=torch.float64)

    def update(scale):  # momentum 0, no Nesterov: the update is s(m, n) polar(G)
        return muon_update(G, torch.zeros_like(G), momentum=0.0, nesterov=False, backend="svd", scale=scale)

    assert rms(orthogonalize(G, "svd")) == pytest.approx(1 / math.sqrt(max(m, n)), rel=1e-12)
    assert rms(update("moonlight")) == pytest.approx(0.2, rel=1e-12)
    assert rms(update("keller")) == pytest.approx(1 / math.sqrt(n), rel=1e-12)  # 1/sqrt(fan_in), tall or wide
    assert rms(update("spectral")) == pytest.approx(math.sqrt(m / n) / math.sqrt(max(m, n)), rel=1e-12)


@pytest.mark.parametrize("backend", ["svd", "ns"])
def test_ema_and_sum_momentum_give_the_same_direction(backend):
    # optimizers.md 1.2 / 8.3: EMA buffer = (1 - beta) x sum buffer, and polar() ignores a positive factor;
    # NS differs only through its 1e-7 in the normalization (fp64 here, so no bf16 noise).
    beta, ema, total = 0.95, torch.zeros(24, 12, dtype=torch.float64), torch.zeros(24, 12, dtype=torch.float64)
    for t in range(5):
        G = gaussian(24, 12, seed=t, dtype=torch.float64)
        ours = muon_update(G, ema, momentum=beta, backend=backend, dtype=torch.float64)
        total.mul_(beta).add_(G)  # B <- beta B + G;  U = G + beta B  (Moonlight, torch's docstring)
        theirs = orthogonalize(G + beta * total, backend, dtype=torch.float64) * math.sqrt(24 / 12)
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6


def test_nesterov_direction_and_grad_untouched():
    G, buf = gaussian(4, 3), gaussian(4, 3, seed=1)
    G0, buf0 = G.clone(), buf.clone()
    U = momentum_direction(G, buf, momentum=0.9, nesterov=True)
    torch.testing.assert_close(buf, 0.9 * buf0 + 0.1 * G0)
    torch.testing.assert_close(U, 0.1 * G0 + 0.9 * buf)
    assert torch.equal(G, G0)  # unlike Keller's code, the gradient is not overwritten


@pytest.mark.parametrize("backend", ["svd", "ns"])
def test_step_applies_the_pure_update(backend):
    # Muon.step() = decoupled decay with the raw lr, then W <- W - lr * muon_update(...), bit for bit
    W = torch.nn.Parameter(gaussian(12, 6))
    ref, buf = W.detach().clone(), torch.zeros(12, 6)
    opt = Muon([W], lr=0.02, weight_decay=0.1, backend=backend, dtype="fp32")
    for t in range(3):
        W.grad = gaussian(12, 6, seed=1 + t)
        opt.step()
        update = muon_update(W.grad, buf, backend=backend, dtype=torch.float32)
        ref = ref.mul(1 - 0.02 * 0.1).add(update, alpha=-0.02)
        assert torch.equal(W.detach(), ref)


@pytest.mark.parametrize("scale, adjust_lr_fn", [("keller", None), ("moonlight", "match_rms_adamw")])
def test_parity_with_torch_optim_muon(scale, adjust_lr_fn):
    # torch.optim.Muon hard-codes bf16 Newton-Schulz (grad.bfloat16(), addmm), so ours runs in bf16 too. Its
    # normalization clamps ||X||_F at 1e-7 where ours adds 1e-7: equal in bf16 unless ||X||_F < ~1e-5. Two
    # same-shape matrices exercise our batched path (baddbmm), which torch does not have. The weights move
    # by ~0.07 in 5 steps; measured max difference 6e-8 (fp32 rounding: ours scales O by s, then by lr;
    # torch multiplies O by lr * s), so 1e-6 is the tolerance; the momentum buffers are identical.
    shapes = [(32, 16), (16, 32), (24, 24), (24, 24)]
    ours = [torch.nn.Parameter(gaussian(*s, seed=i)) for i, s in enumerate(shapes)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = Muon(ours, lr=0.02, momentum=0.95, weight_decay=0.1, scale=scale, dtype="bf16")
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    for t in range(5):
        for i, (p, q) in enumerate(zip(ours, ref)):
            p.grad = gaussian(*p.shape, seed=100 * t + i)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_rejects_non_matrices_and_bad_values():
    with pytest.raises(ValueError, match=r"2-D matrices only; got a parameter of shape \(5,\)"):
        Muon([torch.nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="backend: 'newton'"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], backend="newton")
    with pytest.raises(ValueError, match=r"optimizer.momentum: must be in \[0, 1\)"):
        MuonSpec(momentum=1.0).validate()
    with pytest.raises(ConfigError, match="optimizer.aux.lr: must be > 0"):  # the nested AdamW, typed and checked
        build_optimizer_spec({"_target_": "optimizers.muon.MuonSpec", "aux": {"lr": -1.0}})
    with pytest.raises(ConfigError, match="optimizer.scale"):
        build_optimizer_spec({"_target_": "optimizers.muon.MuonSpec", "scale": "unit"})


def tiny_problem(spec, seed=0):
    """The default tiny GPT-2, `spec` built over its parameter split, and one fixed random batch (4 x 64)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig())
    opt = spec.build(split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP))
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 4096, (4, 64), generator=g) for _ in range(2))
    return model, opt, (x, y)


def train(model, opt, batch, steps):
    losses = []
    for _ in range(steps):
        _, loss = model(*batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_hybrid_lowers_the_loss():
    model, opt, batch = tiny_problem(MuonSpec())
    assert isinstance(opt, Hybrid) and [type(o).__name__ for o in opt.optimizers] == ["Muon", "AdamW"]
    losses = train(model, opt, batch, 15)
    # memorizing one batch: ln(4096) = 8.32 at start, measured 1.68 after 15 steps
    assert losses[0] == pytest.approx(8.34, abs=0.05) and losses[-1] < 3.0


def check_state_round_trip(spec):
    """A fresh optimizer loaded from state_dict() takes the identical next step (bit for bit)."""
    model, opt, batch = tiny_problem(spec)
    train(model, opt, batch, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, batch, 1)
    model2, opt2, _ = tiny_problem(spec, seed=1)  # different initial weights, overwritten below
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(model2, opt2, batch, 1)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def check_same_seed_same_result(spec):
    (m1, o1, b1), (m2, o2, b2) = tiny_problem(spec), tiny_problem(spec)
    assert train(m1, o1, b1, 3) == train(m2, o2, b2, 3)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_state_round_trip():
    check_state_round_trip(MuonSpec())


def test_same_seed_same_result():
    check_same_seed_same_result(MuonSpec())
