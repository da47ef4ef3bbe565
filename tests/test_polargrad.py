"""PolarGrad against its reference maths (docs/optimizers.md 2.3, check 5 of section 8): the nuclear norm as
<M, polar(M)>, one and two steps of both rules against an fp64 SVD reference, every back-end, and the
optimizer contract (lowers a loss, state round trip, determinism)."""

import copy
import math

import pytest
import torch
from conftest import rounding_tol
from test_muon import assert_every_parameter_moved, snapshot

from harness.config.schema import ConfigError
from harness.config.validate import build_optimizer_spec
from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.groups import split_parameters
from optimizers.ortho import DTYPES, orthogonalize
from optimizers.polargrad import PolarGrad, PolarGradSpec


def svd_polar(x):
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    return U @ Vh, S.sum()


@pytest.mark.parametrize("shape", [(64, 32), (32, 96), (48, 48)])
def test_nuclear_norm_is_inner_product_with_qdwh_polar(shape):
    # fp32: the sum of the m n products M_ij O_ij (sum |M_ij O_ij| is within 3% of ||M||_* here), and QDWH's
    # O orthogonal only to a few eps (its max(m, n)-term sums): <M, O> is stationary in O's rotations but
    # feels that departure to first order, <= ||M||_* times it: rounding_tol(m n) + rounding_tol(max(m, n))
    # relative, ~6e-6; measured 2e-9 to 2e-8. QDWH stopped one iteration short (small singular values
    # under-mapped) is 2e-3 off, NS5's polar factor 5e-2.
    torch.manual_seed(0)
    m, n = shape
    M = torch.randn(shape) * torch.logspace(0, -3, shape[1])  # singular values over 3 decades
    nuc = (M * orthogonalize(M, "qdwh")).sum()
    ref = torch.linalg.svdvals(M.double()).sum()
    tol = rounding_tol(m * n, torch.float32) + rounding_tol(max(m, n), torch.float32)
    assert abs(nuc.double() - ref) / ref < tol


def reference_steps(W, grads, lr, momentum, wd, extra, polar_first):
    """The update rules of docs/optimizers.md 2.3 in fp64 with the SVD polar factor: W after each step."""
    W, M, out = W.double().clone(), torch.zeros_like(W, dtype=torch.float64), []
    for G in grads:
        G = G.double()
        if polar_first:
            U, nu = svd_polar(G)
            M = momentum * M + (1 - momentum) * U
            step = nu * M
        else:
            M = momentum * M + (1 - momentum) * G
            U, nuc = svd_polar(M)
            step = nuc * U
        W = (1 - lr * wd) * W - lr * extra * step
        out.append(W)
    return out


@pytest.mark.parametrize("polar_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_step_matches_svd_reference(polar_first, dtype):
    torch.manual_seed(1)
    W0, grads = torch.randn(24, 16, dtype=dtype), [torch.randn(24, 16, dtype=dtype) for _ in range(2)]
    W = torch.nn.Parameter(W0.clone())
    opt = PolarGrad([W], PolarGradSpec(lr=0.1, momentum=0.9, weight_decay=0.5, polar_first=polar_first,
                                       backend="qdwh", ns_steps=None, extra_scale=0.5, lr_scale="raw"))
    refs = reference_steps(W0, grads, lr=0.1, momentum=0.9, wd=0.5, extra=0.5, polar_first=polar_first)
    eps = torch.finfo(dtype).eps
    for t, (G, ref) in enumerate(zip(grads, refs), start=1):
        W.grad = G.clone()
        opt.step()
        # error relative to the size of the change since W0 (the second step also tests the momentum): W's
        # own rounding, a few eps of ||W|| per step, seen against ||W - W0||; and QDWH's polar factor, exact
        # to ~kappa(M) sqrt(m n) eps (kappa of these Gaussian 24 x 16 matrices: ~5)
        change = (ref - W0.double()).norm()
        kappa = max(float(torch.linalg.cond(g.double())) for g in grads)
        tol = eps * (2 * t * ref.norm() / change + kappa * math.sqrt(W.numel()))
        assert (W.detach().double() - ref).norm() / change < tol


# The scalar map's range: where each back-end sends the singular values of G / ||G||_F (all >= `floor`).
# Exact back-ends: 1 to rounding (Polar Express 8 steps: within 4e-15 of 1 on [1e-3, 1], docs/optimizers.md 8.1);
# Polar Express 5 steps maps [1e-3, 1] into [0.840, 1.124], Keller's NS5 [0.01, 1] into [0.682, 1.134]
# (docs/optimizers.md 1.2; these are the fp64 maps' extremes). qdwh_ns is not converged either (small singular
# values under-mapped); its check is against the same recipe in fp64, in tests/test_ortho.py.
EXACT = (1.0, 1.0, 0.0)


@pytest.mark.parametrize("backend, dtype, steps, scalar_range", [
    ("svd", "fp32", None, EXACT),
    ("qdwh", "fp32", None, EXACT),  # measured 1.6e-7 from the exact step
    ("polar_express", "fp32", 8, (1.0, 1.0, 1e-3)),  # measured 1.3e-6
    ("polar_express", "fp32", 5, (0.840, 1.124, 1e-3)),  # measured 0.09
    ("polar_express", "bf16", 5, (0.840, 1.124, 1e-3)),
    # Keller's NS5 does not converge, and <G, O> then underestimates ||G||_* (by 28% on these Gaussian
    # matrices): measured 0.32 and 0.37
    ("ns", "fp32", 5, (0.682, 1.134, 0.01)),
    ("ns", "bf16", 5, (0.682, 1.134, 0.01)),
])
@pytest.mark.parametrize("shape", [(48, 32), (32, 80)])
def test_each_backend_gives_the_polargrad_step(backend, dtype, steps, scalar_range, shape):
    torch.manual_seed(2)
    m, n = shape
    W0, G = torch.randn(shape), torch.randn(shape)
    W = torch.nn.Parameter(W0.clone())
    W.grad = G.clone()
    PolarGrad([W], PolarGradSpec(lr=1.0, momentum=0.0, backend=backend, ns_steps=steps, dtype=dtype,
                                 lr_scale="raw")).step()
    step = (W0 - W.detach()).double()
    # The rule with this back-end's polar factor O (the same call, so the same O): step = <G, O> O. Ours forms
    # <G, O> as an fp32 sum of m n products, rounding_tol(m n) of sum |G_ij O_ij| (<= 1.03 <G, O> here), and
    # W - step and the test's W0 - W round once each, <= eps/2 of |W0| + 3 |step| in all (|step| ~ 100).
    # Measured: at most 0.72 of that (a W entry's last rounding: its half-ulp bound is strict, not typical);
    # a step without <G, O> (~1e2 off) or with another matrix's polar factor is far outside.
    O = orthogonalize(G, backend, steps, DTYPES[dtype]).double()
    inner = (G.double() * O).sum()
    expect = inner * O
    rtol = rounding_tol(m * n, torch.float32) * ((G.double() * O).abs().sum() / inner).item()
    atol = torch.finfo(torch.float32).eps / 2 * (W0.double().abs() + 3 * step.abs())
    assert ((step - expect).abs() <= rtol * expect.abs() + atol).all()
    # And how far that is from the exact step ||G||_* U V^T = (sum s) U V^T: with O = U f(S) V^T and the map f
    # in [lo, hi], the step is (sum s f) U f V^T, relatively sqrt(mean_i (nu f_i - 1)^2), nu = sum s f / sum s,
    # off, <= max(hi^2 - 1, 1 - lo^2) since nu too is in [lo, hi]; plus rounding: the iteration's (3 rounded
    # products a step, in its dtype) and the fp32 polar factor's, whose condition number is kappa(G), times
    # the m n-term sums' rounding. NS5: 0.54 (measured 0.32 and 0.37), PE5: 0.29 (0.09), exact: ~4e-5 (1e-6).
    # Missing the nuclear norm, the wrong sign or another matrix's polar factor is >= 1 off.
    lo, hi, floor = scalar_range
    U, nuc = svd_polar(G)
    s = torch.linalg.svdvals(G.double())
    assert (s / s.norm()).min() >= floor  # the range above holds for these singular values
    kappa = (s[0] / s[-1]).item()
    iteration = rounding_tol(3 * steps, DTYPES[dtype]) if backend in ("ns", "polar_express") else 0.0
    tol = max(hi**2 - 1, 1 - lo**2) + iteration + kappa * rounding_tol(m * n, torch.float32)
    assert (step - nuc * U).norm() / (nuc * U).norm() < tol


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig())
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP)
    gen = torch.Generator().manual_seed(123)
    batch = torch.randint(0, 4096, (4, 65), generator=gen)
    return model, split, batch[:, :-1], batch[:, 1:]


def train_steps(model, opt, x, y, n):
    losses = []
    for _ in range(n):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_lowers_the_loss_of_the_tiny_model():
    model, split, x, y = tiny_gpt2()
    before = snapshot(model)
    losses = train_steps(model, PolarGradSpec().build(split), x, y, 30)  # the defaults: lr 0.02, muon_at_init
    assert losses[0] == pytest.approx(8.32, abs=0.02)  # ~ln(4096) at init
    # memorising one batch: the loss falls by 8.3 (to ~1e-3); with the matrices frozen (AdamW alone) it still
    # falls to 0.006, so the parameters must all move too (a dead PolarGrad half would pass the loss check)
    assert losses[-1] < losses[0] - 4.0
    assert_every_parameter_moved(model, before)


def test_state_round_trip_gives_the_same_next_step():
    model, split, x, y = tiny_gpt2()
    opt = PolarGradSpec(lr=0.05, polar_first=True, backend="ns").build(split)
    train_steps(model, opt, x, y, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(model, opt, x, y, 1)

    model2, split2, _, _ = tiny_gpt2(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = PolarGradSpec(lr=0.05, polar_first=True, backend="ns").build(split2)
    opt2.load_state_dict(saved_opt)
    train_steps(model2, opt2, x, y, 1)
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        model, split, x, y = tiny_gpt2(seed=7)
        runs.append((train_steps(model, PolarGradSpec(lr=0.05).build(split), x, y, 2), model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize("key, value", [("backend", "zolo"), ("ns_steps", 0), ("extra_scale", 0.0),
                                        ("momentum", 1.0), ("dtype", "fp8"), ("lr_scale", "adam")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"optimizer.{key}"):
        build_optimizer_spec({"_target_": "optimizers.polargrad.PolarGradSpec", key: value})


@pytest.mark.parametrize("polar_first", [False, True])
def test_muon_at_init_gives_the_first_update_muons_size(polar_first):
    # The a-priori lr rule (optimizers/polargrad.py): at lr, PolarGrad's first update over all hidden matrices
    # has the Frobenius norm of Muon's at lr with Keller's scale and an exact polar factor,
    # lr sqrt(sum_b max(1, m/n) min(m, n)) over the matrices b (Q, K, V apart); then c stays fixed.
    model, split, x, y = tiny_gpt2()
    model.double()
    lr = 0.02
    opt = PolarGradSpec(lr=lr, backend="svd", dtype="fp64", polar_first=polar_first).build(split)
    pg = opt.optimizers[0]
    assert pg.param_groups[0]["lr_calibration"] is None
    hidden = split.params("hidden")
    before = [p.detach().clone() for p in hidden]
    train_steps(model, opt, x, y, 1)
    moved = sum(float((p.detach() - b).square().sum()) for p, b in zip(hidden, before))
    blocks = pg.param_groups[0]["row_blocks"]
    muon = sum(max(1.0, r / p.shape[1]) * min(r, p.shape[1]) for p, rows in zip(hidden, blocks) for r in rows)
    assert math.sqrt(moved) == pytest.approx(lr * math.sqrt(muon), rel=1e-10)  # fp64, exact polar
    c = pg.param_groups[0]["lr_calibration"]
    assert c > 0
    train_steps(model, opt, x, y, 2)
    assert pg.param_groups[0]["lr_calibration"] == c  # fixed after the first step


def test_raw_lr_scale_is_the_references_lr():
    model, split, x, y = tiny_gpt2()
    opt = PolarGradSpec(lr=0.05, lr_scale="raw", backend="svd").build(split)
    assert opt.optimizers[0].param_groups[0]["lr_calibration"] == 1.0
    train_steps(model, opt, x, y, 1)
    assert opt.optimizers[0].param_groups[0]["lr_calibration"] == 1.0
    # the class takes the spec's rule: raw starts (and stays) at c = 1, muon_at_init leaves c to step 1
    W = torch.nn.Parameter(torch.ones(2, 2))
    assert PolarGrad([W], PolarGradSpec(lr_scale="raw")).param_groups[0]["lr_calibration"] == 1.0
    assert PolarGrad([W], PolarGradSpec()).param_groups[0]["lr_calibration"] is None
