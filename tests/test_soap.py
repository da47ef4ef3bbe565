"""SOAP against its equations (docs/optimizers.md 7; nikhilvyas/SOAP soap.py) on small matrices, with an explicit
fp64 reference that keeps M in the original space and computes every basis with torch.linalg.eigh; Adam
when no side is rotated; the eigh fallback; and with its auxiliary AdamW on the tiny GPT-2: it lowers the
loss, its state survives save/load bit for bit, a seed fixes the result; a bad value in its YAML fails naming
the key. Helpers from tests/test_muon.py."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_muon import check_same_seed_same_result, check_state_round_trip, gaussian, tiny_problem, train

from harness.config.schema import ConfigError
from harness.config.validate import build_optimizer_spec
from optimizers.hybrid import CombinedOptimizer
from optimizers.soap import SOAP, SOAPSpec, eigenbasis, initial_basis, refresh_side

YAML = Path(__file__).resolve().parent.parent / "conf" / "optimizer" / "soap.yaml"
EPS = torch.finfo(torch.float32).eps


def eigh_tol(n: int) -> float:
    """fp32 eigh is backward stable: |QᵀQ - I| and |Q Λ Qᵀ - S| / |S| are <= p(n) eps, p(n) a small multiple
    of n (measured 0.4-1.1 n eps at n = 5, 6; 0.02 n eps at n = 512); 4 n eps. A basis in the wrong precision
    (bf16: eps 8e-3), transposed or from another matrix is off by 1e-2 or O(1)."""
    return 4 * n * EPS


def reference_soap(W, grads, *, lr, betas, eps, wd, freq, max_dim, info=None):
    """The docstring's equations, written out in fp64: first call only sets L, R and the bases; then Adam on
    G' = Q_L^T G Q_R with M in the original space, rotated back; V's rows/columns reordered at a refresh.
    info (a dict), if given, gets "kappa": the largest λ_max / (smallest eigenvalue gap) of the L and R the
    bases were taken from (eigenvectors are sensitive to rounding by that factor)."""
    b1, b2 = betas
    W, G = W.double().clone(), grads[0].double()
    m, n = W.shape
    L = (1 - b2) * G @ G.T if m <= max_dim else None
    R = (1 - b2) * G.T @ G if n <= max_dim else None
    M, V = torch.zeros_like(W), torch.zeros_like(W)

    def basis(S, k):
        if S is None:
            return torch.eye(k, dtype=torch.float64)
        eig = torch.linalg.eigvalsh(S)
        if info is not None:
            info["kappa"] = max(info.get("kappa", 0.0), (eig[-1] / eig.diff().min()).item())
        return torch.linalg.eigh(S).eigenvectors.flip(-1)

    QL, QR = basis(L, m), basis(R, n)
    for t, G in enumerate((g.double() for g in grads[1:]), start=1):
        M = b1 * M + (1 - b1) * G
        V = b2 * V + (1 - b2) * (QL.T @ G @ QR) ** 2
        U = QL @ ((QL.T @ M @ QR) / (V.sqrt() + eps)) @ QR.T
        W = W * (1 - lr * wd) - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * U
        if L is not None:
            L = b2 * L + (1 - b2) * G @ G.T
        if R is not None:
            R = b2 * R + (1 - b2) * G.T @ G
        if t % freq == 0:  # reorder V by the old columns' Rayleigh quotients in the new L, R
            if L is not None:
                V = V[torch.diag(QL.T @ L @ QL).argsort(descending=True)]
            if R is not None:
                V = V[:, torch.diag(QR.T @ R @ QR).argsort(descending=True)]
            QL, QR = basis(L, m), basis(R, n)
    return W


@pytest.mark.parametrize("shape, max_dim", [((6, 6), 10000), ((6, 20), 10)])
def test_steps_match_the_explicit_fp64_reference(shape, max_dim):
    # 1 + 12 calls with a refresh after updates 3, 6, 9, 12; square (both sides full rank after the first
    # gradient, so the bases are unique up to signs, which the update does not see) and 6 x 20 with
    # max_precond_dim 10 (R = identity, L full rank). W moves by ~0.1.
    hp = {"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8, "wd": 0.1, "freq": 3, "max_dim": max_dim}
    W0 = gaussian(*shape, seed=7)
    grads = [gaussian(*shape, seed=10 + t) * (1 + t % 3) for t in range(13)]
    W = torch.nn.Parameter(W0.clone())
    opt = SOAP([W], SOAPSpec(lr=hp["lr"], betas=list(hp["betas"]), eps=hp["eps"], weight_decay=hp["wd"],
                             precondition_frequency=hp["freq"], max_precond_dim=max_dim))
    W.grad = grads[0]
    opt.step()
    assert torch.equal(W.detach(), W0)  # the first step only initialises the preconditioner (reference)
    for t in range(1, len(grads)):
        W.grad = grads[t].clone()
        opt.step()
        assert torch.equal(W.grad, grads[t])
        info = {}
        ref = reference_soap(W0, grads[: t + 1], **hp, info=info)
        # fp32 W, state and eigh against fp64, worst case per step: W's rounding (eps/2 |W|) and the update lr U
        # (|U| ~ 1) off by the bases' error, ~sqrt(n) kappa eps (kappa <= 44 here). At step 12: 3.7e-6
        # (measured 7.4e-7; plain Adam, without the rotation, lands > 1e-3 away, checked below).
        kappa = info.get("kappa", 1.0)
        atol = t * EPS * (W0.abs().max().item() / 2 + hp["lr"] * math.sqrt(min(shape)) * kappa)
        torch.testing.assert_close(W.detach().double(), ref, rtol=0, atol=atol)
    state = opt.state[W]
    assert state["step"] == 12 and (state["R"] is None) == (shape[1] > max_dim)
    for Q in (state["QL"], state["QR"]):  # orthogonal rotations
        if Q is not None:
            torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0]), rtol=0, atol=eigh_tol(Q.shape[0]))
    # the update really is rotated: Adam in the original space (identity bases) lands elsewhere
    plain = reference_soap(W0, grads, **{**hp, "max_dim": 1})
    assert (plain - W.detach().double()).abs().max().item() > 1e-3


def test_without_rotation_it_is_adamw_from_the_second_step():
    # max_precond_dim below both sides: identity bases, so SOAP = torch.optim.AdamW fed gradients 2..T
    # (eps enters as eps * sqrt(1 - b2^t) there vs eps here: invisible for O(1) gradients). The two round the
    # update differently, so W may round differently at each step: <= steps x eps |W| (measured 7.5e-9 vs
    # 1.6e-6); a bias-correction or decay slip moves W by ~lr = 1e-2 x a fraction.
    W, V = torch.nn.Parameter(gaussian(5, 7)), torch.nn.Parameter(gaussian(5, 7))
    opt = SOAP([W], SOAPSpec(lr=0.01, betas=[0.9, 0.95], weight_decay=0.1, max_precond_dim=4))
    ref = torch.optim.AdamW([V], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    W.grad = gaussian(5, 7, seed=99)
    opt.step()
    assert all(opt.state[W][k] is None for k in ("L", "R", "QL", "QR"))
    for t in range(6):
        W.grad = gaussian(5, 7, seed=t)
        V.grad = W.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(W, V, rtol=0, atol=6 * EPS * V.abs().max().item())


def test_bases_sort_eigenvalues_descending_and_refresh_reorders_v():
    A = gaussian(5, 8, dtype=torch.float64)
    S = A @ A.T
    Q = eigenbasis(S)
    eig = torch.diag(Q.T @ S @ Q)
    assert Q.dtype == torch.float64 and bool((eig[:-1] > eig[1:]).all())
    assert ((Q @ torch.diag(eig) @ Q.T - S).norm() / S.norm()).item() < eigh_tol(5)  # computed in fp32
    # an old basis whose columns are the new ones reversed: V's rows come out reversed
    V = torch.arange(10.0, dtype=torch.float64).reshape(5, 2)
    refresh_side(S, Q.flip(-1), V, 0)
    assert torch.equal(V, torch.arange(10.0, dtype=torch.float64).reshape(5, 2).flip(0))


def test_eigh_failure_keeps_the_previous_basis():
    S, Q = torch.full((4, 4), float("nan")), torch.linalg.qr(gaussian(4, 4))[0]
    V = gaussian(4, 3)
    V0 = V.clone()
    assert eigenbasis(S) is None
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        assert refresh_side(S, Q, V, 0) is Q
    assert torch.equal(V, V0)
    with pytest.warns(UserWarning, match="identity basis"):
        assert torch.equal(initial_basis(S), torch.eye(4))


def test_hybrid_lowers_the_loss():
    model, opt, batch = tiny_problem(SOAPSpec())
    assert isinstance(opt, CombinedOptimizer)
    assert [type(o).__name__ for o in opt.optimizers] == ["SOAP", "AdamW"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = train(model, opt, batch, 15)
    # both halves step every tensor they hold (AdamW alone, on the embeddings, reaches 2.2: the loss cannot tell)
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    # memorizing one batch: ln(4096) = 8.32 at start. After 15 steps (a refresh at 10) measured 4.95 when this
    # was written, 5.36 with 2 threads and 5.16 with 1 (2-core AMD EPYC, 2026-12-01): the path has loss spikes
    # that the summation order moves, so the bound asks for half the smallest drop seen (3.0), not a value
    assert losses[0] == pytest.approx(8.34, abs=0.05) and losses[-1] < losses[0] - 1.5
    Q = opt.optimizers[0].state[model.get_parameter("transformer.h.0.mlp.c_fc.weight")]["QL"]
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[0]), rtol=0, atol=eigh_tol(Q.shape[0]))


def test_state_round_trip():
    # the step after loading refreshes the bases (update 4, frequency 2)
    check_state_round_trip(SOAPSpec(precondition_frequency=2))


def test_same_seed_same_result():
    check_same_seed_same_result(SOAPSpec())


def test_yaml_matches_the_spec_and_bad_values_name_the_key():
    node = OmegaConf.load(YAML)
    assert build_optimizer_spec(node) == SOAPSpec()
    with pytest.raises(ConfigError, match=r"^optimizer\.lr: must be > 0 \(got 0"):
        build_optimizer_spec(OmegaConf.merge(node, {"lr": 0}))
    with pytest.raises(ConfigError, match=r"^optimizer\.precondition_frequency: must be >= 1"):
        build_optimizer_spec(OmegaConf.merge(node, {"precondition_frequency": 0}))
    with pytest.raises(ConfigError, match=r"^optimizer\.aux\.betas: need two values"):
        build_optimizer_spec(OmegaConf.merge(node, {"aux": {"betas": [1.0, 0.9]}}))
    with pytest.raises(ValueError, match=r"2-D matrices only; got a parameter of shape \(5,\)"):
        SOAP([torch.nn.Parameter(torch.zeros(5))], SOAPSpec())
