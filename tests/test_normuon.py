"""NorMuon's row normalization against the official code's maths (optimizers.md 5.2, check 8.8) and NorMuon
through the Hybrid on the tiny GPT-2 (loss, save/load, seed), with the helpers of tests/test_muon.py."""

import pytest
import torch
from test_muon import check_same_seed_same_result, check_state_round_trip, gaussian, tiny_problem, train

from optimizers.muon import Muon
from optimizers.normuon import NorMuon, NorMuonSpec, normuon_normalize
from optimizers.ortho import polar_svd


def row_rms(X):
    return X.square().mean(dim=-1).sqrt()


def test_first_step_against_the_formula():
    # v starts at 0 with no bias correction: after one step v = (1 - beta2) r, r_i = mean_j O_ij^2
    O = gaussian(6, 4, dtype=torch.float64)
    v = torch.zeros(6, 1, dtype=torch.float64)
    out = normuon_normalize(O, v, beta2=0.95)
    r = O.square().mean(dim=1, keepdim=True)
    torch.testing.assert_close(v, 0.05 * r, rtol=1e-14, atol=0)
    expected = O / (0.05 * r).sqrt()
    # up to the 1e-10 epsilons of the two divisions
    torch.testing.assert_close(out, expected * O.norm() / expected.norm(), rtol=1e-9, atol=0)


def test_frobenius_norm_is_kept():
    # check 8.8: ||O^||_F == ||O||_F (official convention), whatever the row scales and the state of v
    v = torch.zeros(32, 1)
    for t in range(10):
        O = gaussian(32, 16, seed=t) * torch.logspace(-2, 1, 32).unsqueeze(1)
        out = normuon_normalize(O, v, beta2=0.95)
        assert out.norm().item() == pytest.approx(O.norm().item(), rel=1e-6)


def test_rows_equalized_once_v_is_warm():
    # check 8.8. (a) Fixed row scales: O_t = D Q_t with Q_t random orthogonal (every row norm exactly 1), so
    # v = (1 - beta2^t) D^2 / n and every row of O^ has the same RMS from the first step on (to fp32 rounding),
    # although the rows of O span a factor 1000.
    d = torch.logspace(-1.5, 1.5, 16).unsqueeze(1)
    v = torch.zeros(16, 1)
    for t in range(3):
        out = normuon_normalize(d * polar_svd(gaussian(16, 16, seed=t)), v, beta2=0.95)
        spread = row_rms(out).max() / row_rms(out).min()
        assert spread.item() == pytest.approx(1.0, abs=1e-5)
    # (b) Tall polar factors, whose row norms fluctuate from step to step: with v warm (50 steps,
    # 0.95^50 = 0.08), the max/min row RMS of O^ is measured 1.8, against 1000 x that fluctuation in O.
    v = torch.zeros(64, 1)
    d = torch.logspace(-1.5, 1.5, 64).unsqueeze(1)
    for t in range(50):
        O = d * polar_svd(gaussian(64, 32, seed=t))
        out = normuon_normalize(O, v, beta2=0.95)
    assert (row_rms(O).max() / row_rms(O).min()).item() > 1000
    assert (row_rms(out).max() / row_rms(out).min()).item() < 2.5


def test_equals_muon_when_rows_are_already_balanced():
    # a square exact polar factor has unit rows: the normalization is the identity, NorMuon == Muon
    params = [torch.nn.Parameter(gaussian(8, 8, seed=s)) for s in (0, 0)]
    opts = [Muon([params[0]], backend="svd", weight_decay=0.1), NorMuon([params[1]], backend="svd", weight_decay=0.1)]
    for t in range(3):
        for p, opt in zip(params, opts):
            p.grad = gaussian(8, 8, seed=10 + t)
            opt.step()
    torch.testing.assert_close(params[0], params[1], rtol=0, atol=1e-6)
    assert opts[1].state[params[1]]["second_momentum_buffer"].shape == (8, 1)


def test_hybrid_lowers_the_loss():
    model, opt, batch = tiny_problem(NorMuonSpec())
    assert [type(o).__name__ for o in opt.optimizers] == ["NorMuon", "AdamW"]
    losses = train(model, opt, batch, 15)
    assert losses[0] == pytest.approx(8.34, abs=0.05) and losses[-1] < 3.0  # measured 1.62 after 15 steps


def test_state_round_trip():
    check_state_round_trip(NorMuonSpec())


def test_same_seed_same_result():
    check_same_seed_same_result(NorMuonSpec())


def test_beta2_is_checked():
    with pytest.raises(ValueError, match=r"optimizer.beta2: must be in \[0, 1\)"):
        NorMuonSpec(beta2=1.0).validate()
