"""The shared orthogonalization back-ends against their scalar maps and the SVD polar factor (docs/optimizers.md
section 8.1), the batched helper against one-by-one calls, and the measured dtype choice."""

import inspect
import math

import pytest
import torch

from optimizers.ortho import (
    KELLER,
    POLAR_EXPRESS_COEFFS,
    _qdwh_schedule,
    compute_dtype,
    newton_schulz,
    orthogonalize,
    orthogonalize_many,
    polar_express,
    polar_svd,
    qdwh,
    qdwh_ns,
)
from runtime.device import bf16_is_fast


def with_singular_values(s: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m x n float64 matrix U diag(s) V^T with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(s) @ V.T


def quintic(x: torch.Tensor, coeffs) -> torch.Tensor:
    for a, b, c in coeffs:
        x = a * x + b * x**3 + c * x**5
    return x


def pe_scalar(x: torch.Tensor, steps: int, safety: float = 1.01) -> torch.Tensor:
    """The Polar Express map of x = sigma / (||G||_F * safety)."""
    listed = [(a / safety, b / safety**3, c / safety**5) for a, b, c in POLAR_EXPRESS_COEFFS[:-1]]
    listed.append(POLAR_EXPRESS_COEFFS[-1])
    return quintic(x, [listed[min(t, len(listed) - 1)] for t in range(steps)])


def test_ns5_scalar_map_range():
    # docs/optimizers.md 1.2: Keller's coefficients deliberately stop in ~[0.68, 1.13], never converging to 1
    y = quintic(torch.logspace(-2, 0, 4001, dtype=torch.float64), [KELLER] * 5)
    assert 0.68 <= y.min().item() < 0.69 and 1.13 < y.max().item() <= 1.135


@pytest.mark.parametrize("steps, lo, hi", [(5, 0.84, 1.124), (8, 1 - 1e-12, 1 + 1e-12)])
def test_polar_express_scalar_map_range(steps, lo, hi):
    # docs/optimizers.md 1.8: [0.84, 1.12] after 5 steps (measured max 1.1236), 1.0000 after 8, for sigma >= 1e-3
    y = pe_scalar(torch.logspace(-3, 0, 4001, dtype=torch.float64) / 1.01, steps)
    assert lo <= y.min().item() and y.max().item() <= hi


@pytest.mark.parametrize("m, n", [(48, 24), (24, 48)])
def test_iterations_apply_their_scalar_map_to_singular_values(m, n):
    # In float64 the matrix iteration must map each singular value sigma to p(sigma / (||G||_F s + 1e-7)),
    # nothing else (s = 1 for NS, the safety factor 1.01 for Polar Express).
    s = torch.logspace(0, -1.5, min(m, n), dtype=torch.float64)
    G = with_singular_values(s, m, n)
    for O, expected in [(newton_schulz(G, dtype=torch.float64), quintic(s / (s.norm() + 1e-7), [KELLER] * 5)),
                        (polar_express(G, steps=5, dtype=torch.float64), pe_scalar(s / (s.norm() * 1.01 + 1e-7), 5))]:
        # the maps are not monotone (NS5 overshoots, then oscillates): compare as sorted sets
        torch.testing.assert_close(torch.linalg.svdvals(O), expected.sort(descending=True).values,
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (3, 40, 24)])
def test_qdwh_matches_svd(shape):
    # fp64 to 1e-10 and fp32 to 1e-5 (max abs entry) on Gaussian matrices, tall/wide/square/batched
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = polar_svd(G)
    assert (qdwh(G) - ref).abs().max().item() < 1e-10
    assert (qdwh(G.float()).double() - ref).abs().max().item() < 1e-5


def test_qdwh_ill_conditioned_fp64():
    # condition number 1e6: QDWH's lower bound l0 = eps covers it; error ~ eps * cond
    G = with_singular_values(torch.logspace(0, -6, 32, dtype=torch.float64), 64, 32)
    assert (qdwh(G) - polar_svd(G)).abs().max().item() < 1e-8


def test_qdwh_runs_a_fixed_schedule():
    # l0 = eps fixes the weights, so the iteration count is known in advance (no convergence test, no host
    # sync): 4 iterations in fp32 (c = 2.7e9, 577, 5.72, 3.01), 6 in fp64; max_iter caps it
    assert [round(c, 2) for _, _, c in _qdwh_schedule(torch.finfo(torch.float32).eps, 10)] == [
        pytest.approx(2.71e9, rel=1e-2), pytest.approx(577, rel=1e-2), 5.72, 3.01]
    assert len(_qdwh_schedule(torch.finfo(torch.float64).eps, 10)) == 6
    assert len(_qdwh_schedule(torch.finfo(torch.float32).eps, 2)) == 2
    G = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    assert torch.equal(qdwh(G, max_iter=4), qdwh(G))  # the schedule ends before the cap
    assert not torch.equal(qdwh(G, max_iter=3), qdwh(G))


@pytest.mark.parametrize("m, n", [(256, 64), (64, 256), (128, 128)])
def test_qdwh_fp32_is_accurate_on_ill_conditioned_input(m, n):
    # condition number 1e4, fp32 input, against the fp64 SVD of that same fp32 matrix. Measured: max entry error
    # 1.5e-6 to 6.7e-6 and nuclear norm <G, polar(G)> to 2.4e-8 relative, the while c > 100 steps formed in fp64;
    # the earlier all-fp32 QR form measured 1.4e-5 (square) to 1.3e-4, which the first bound rejects for 256 x 64
    # and 64 x 256
    G = with_singular_values(torch.logspace(0, -4, min(m, n), dtype=torch.float64), m, n).float()
    ref = polar_svd(G.double())
    O = qdwh(G)
    assert O.dtype == torch.float32
    assert (O.double() - ref).abs().max().item() < 2e-5
    nuclear = torch.linalg.svdvals(G.double()).sum()
    assert abs(((G.double() * O.double()).sum() / nuclear).item() - 1) < 1e-7


@pytest.mark.parametrize("method, steps, lo, hi, min_cosine", [
    ("ns", 5, 0.6, 1.2, 0.98),  # NS5's own range [0.68, 1.13] plus bf16 rounding
    ("polar_express", 5, 0.8, 1.15, 0.99),
    ("polar_express", 8, 0.95, 1.05, 0.999),  # converged, up to bf16 rounding (8 mantissa bits)
])
def test_bf16_iterations_are_near_orthogonal(method, steps, lo, hi, min_cosine):
    G = torch.randn(96, 48, generator=torch.Generator().manual_seed(2))
    O = orthogonalize(G, method, steps, torch.bfloat16)
    assert O.dtype == torch.float32
    sv = torch.linalg.svdvals(O.double())
    assert lo <= sv.min().item() and sv.max().item() <= hi
    ref = polar_svd(G.double())
    cosine = (O.double() * ref).sum() / (O.double().norm() * ref.norm())
    # U S' V^T against U V^T: cosine = sum(S') / (sqrt(n) ||S'||), 1 only for S' = 1
    assert cosine.item() > min_cosine


def test_zero_matrix_stays_finite():
    # a zero gradient (e.g. an unused layer) must give a zero update, not NaN: the eps in the normalization
    Z = torch.zeros(8, 4)
    for method in ("ns", "polar_express", "qdwh", "qdwh_ns"):
        assert torch.equal(orthogonalize(Z, method, dtype=torch.float32), Z)


def test_orthogonalize_many_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    Gs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(16, 8), (8, 16), (16, 8), (5, 5), (16, 8)]]
    for method in ("ns", "polar_express", "qdwh", "qdwh_ns", "svd"):
        many = orthogonalize_many(Gs, method, dtype=torch.float64)
        for G, O in zip(Gs, many):
            assert O.shape == G.shape and O.dtype == torch.float64
            torch.testing.assert_close(O, orthogonalize(G, method, dtype=torch.float64), rtol=0, atol=1e-12)


def test_unknown_method_and_dtype_are_errors():
    with pytest.raises(ValueError, match="unknown method 'nss'"):
        orthogonalize(torch.eye(3), "nss")
    with pytest.raises(ValueError, match="dtype: 'fp16'"):
        compute_dtype(torch.device("cpu"), "fp16")


def test_compute_dtype_is_measured():
    cpu = torch.device("cpu")
    assert (compute_dtype(cpu) == torch.bfloat16) == bf16_is_fast(cpu)
    assert compute_dtype(cpu) in (torch.bfloat16, torch.float32)
    assert [compute_dtype(cpu, d) for d in ("fp32", "bf16", "fp64")] == [torch.float32, torch.bfloat16, torch.float64]


# ---------------------------------------------------------------------------------------------------------------
# qdwh_ns: the PolarGrad reference's recipe (timlautk/polargrad: QDWH with max_iterations = inner_steps = 2 from
# l0 = eps, no convergence test, then always one cubic Newton-Schulz polish)

EPS32 = torch.finfo(torch.float32).eps


def published_weights(lower: float) -> tuple[float, float, float, float]:
    """QDWH's dynamic weights for the lower bound l, and the next bound (Nakatsukasa, Bai & Gygi 2010, eqs.
    3.3-3.5): d = (4 (1 - l^2) / l^4)^(1/3), a = sqrt(1 + d) + sqrt(8 - 4 d + 8 (2 - l^2) / (l^2 sqrt(1 + d))) / 2,
    b = (a - 1)^2 / 4, c = a + b - 1, l' = l (a + b l^2) / (1 + c l^2)."""
    l2 = lower**2
    d = (4 * (1 - l2) / l2**2) ** (1 / 3)
    a = math.sqrt(1 + d) + 0.5 * math.sqrt(8 - 4 * d + 8 * (2 - l2) / (l2 * math.sqrt(1 + d)))
    b = (a - 1) ** 2 / 4
    c = a + b - 1
    return a, b, c, lower * (a + b * l2) / (1 + c * l2)


def recipe_fp64(G: torch.Tensor, steps: int = 2, l0: float = EPS32) -> torch.Tensor:
    """The recipe in fp64, one 2-D matrix, the textbook way: X0 = G / sqrt(||G||_1 ||G||_inf) (tall side),
    each step from the QR [sqrt(c) X; I] = [Q1; Q2] R as X <- (b/c) X + (a - b/c) / sqrt(c) Q1 Q2^T, then
    X <- 1.5 X - 0.5 X X^T X. l0 = fp32's eps: the recipe for fp32 gradients, whatever this arithmetic."""
    X = G.double()
    wide = X.shape[0] < X.shape[1]
    if wide:
        X = X.T
    X = X / math.sqrt(torch.linalg.matrix_norm(X, 1).item() * torch.linalg.matrix_norm(X, math.inf).item())
    m, n = X.shape
    lower = l0
    for _ in range(steps):
        a, b, c, lower = published_weights(lower)
        Q, _ = torch.linalg.qr(torch.cat([math.sqrt(c) * X, torch.eye(n, dtype=torch.float64)]))
        X = (b / c) * X + (a - b / c) / math.sqrt(c) * Q[:m] @ Q[m:].T
    X = 1.5 * X - 0.5 * X @ (X.T @ X)
    return X.T if wide else X


def recipe_map(s: torch.Tensor, steps: int = 2, l0: float = EPS32) -> torch.Tensor:
    """What the recipe does to a singular value s of X0, in exact arithmetic: each step's rational map
    s (a + b s^2) / (1 + c s^2), then the polish's 1.5 s - 0.5 s^3."""
    lower = l0
    for _ in range(steps):
        a, b, c, lower = published_weights(lower)
        s = s * (a + b * s * s) / (1 + c * s * s)
    return 1.5 * s - 0.5 * s**3


def scaled_singular_values(G: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The singular values of the recipe's X0 = G / alpha, alpha = sqrt(||G||_1 ||G||_inf) (fp64), and alpha."""
    G = G.double()
    alpha = math.sqrt(torch.linalg.matrix_norm(G, 1).item() * torch.linalg.matrix_norm(G, math.inf).item())
    return torch.linalg.svdvals(G) / alpha, alpha


def recipe_input(kind: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """fp32 test input: Gaussian, or singular values log-spaced from 1 to 1/cond ("cond1e4")."""
    if kind == "gauss":
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    *lead, m, n = shape
    s = torch.logspace(0, -math.log10(float(kind[4:])), min(m, n), dtype=torch.float64)
    mats = [with_singular_values(s, m, n, seed=seed + i).float() for i in range(math.prod(lead))]
    return torch.stack(mats).reshape(shape)


def test_recipe_reference_applies_the_scalar_map():
    # the test's own two pieces agree: the fp64 QR-form iteration maps each singular value by recipe_map
    G = with_singular_values(torch.logspace(0, -6, 40, dtype=torch.float64), 64, 40, seed=4)
    s, _ = scaled_singular_values(G)
    torch.testing.assert_close(torch.linalg.svdvals(recipe_fp64(G)), recipe_map(s).sort(descending=True).values,
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (128, 128), (3, 96, 48)])
@pytest.mark.parametrize("kind", ["gauss", "cond1e4"])
def test_qdwh_ns_matches_fp64_reference(shape, kind):
    # fp32 qdwh_ns on an fp32 matrix against recipe_fp64 on the same matrix. Tolerance, Frobenius norm, per matrix:
    # (1) qdwh_ns rounds X0 = G / alpha to fp32 (the reference does not): X0 + E with |E| <= u |X0| entrywise,
    #     u = eps32 / 2, so ||E||_F <= u ||X0||_F. The recipe is the generalized matrix function
    #     X -> U f(S) V^T (f = recipe_map); its Frechet derivative multiplies the components of E in the singular
    #     bases by f'(s_i), (f(s_i) -+ f(s_j)) / (s_i -+ s_j) or f(s_j) / s_j, all at most
    #     K = max(sup |f'| on [s_min, s_max], max f(s_i) / s_i), so to first order the error is <= K u ||X0||_F.
    #     K s_max ~ the condition number (f(s_min) / s_min dominates): this term is the conditioning's share.
    # (2) the fp32 arithmetic of the second iteration and the polish (the first runs in fp64): rounding of a
    #     few eps32 per unit of the output's Frobenius norm sqrt(n), taken as 16 eps32 sqrt(n) (measured 1.5-7.3
    #     eps32 sqrt(n) over Gaussian and condition-1e2 inputs, where term (1) is small).
    # Measured error / tolerance here: 0.04-0.11 (0.008-0.08 with both iterations in fp64, fp64_above=100);
    # term (1) dominates at condition number 1e4. A third iteration (steps=3) is 1e3-8e4 tolerances away.
    G = recipe_input(kind, shape, seed=7)
    O = qdwh_ns(G)
    assert O.shape == G.shape and O.dtype == torch.float32
    for g, o in zip(G.reshape(-1, *shape[-2:]), O.reshape(-1, *shape[-2:])):
        s, _ = scaled_singular_values(g)
        grid = torch.logspace(math.log10(s[-1].item()), math.log10(s[0].item()), 20001,
                              dtype=torch.float64).requires_grad_()
        slope, = torch.autograd.grad(recipe_map(grid).sum(), grid)
        K = max(slope.abs().max().item(), (recipe_map(s) / s).max().item())
        n = min(g.shape)
        tol = K * (EPS32 / 2) * s.norm().item() + 16 * EPS32 * math.sqrt(n)
        err = (o.double() - recipe_fp64(g)).norm().item()
        assert err <= tol, (err, tol, K * s[0].item())


@pytest.mark.parametrize("shape", [(128, 128), (384, 128), (128, 512)])
@pytest.mark.parametrize("kind", ["gauss", "cond1e4", "lowrank"])
def test_qdwh_ns_nuclear_norm_scale(shape, kind):
    # The reference's step scale <M, U> is not ||M||_*: the recipe is not converged. In exact arithmetic
    # <G, U> = alpha sum_i s_i f(s_i) = sum_i sigma_i f(sigma_i / alpha), f = recipe_map, which maps [eps32, 1]
    # into [0.728, 1]: so the gap 1 - <G, U> / ||G||_* lies in [0, 0.272]. Measured gaps (these shapes):
    # Gaussian 0.076-0.110, condition number 1e4 0.166-0.167, rank 4 x 10 plus 0.01 noise 0.262-0.268
    # (converged QDWH: below 1e-6; its scale is 1.08-1.37x the recipe's).
    # The fp32 implementation must match the prediction to fp32 accuracy. To first order in X0's rounding E
    # (test above), <G, U> moves by alpha sum_i s_i f'(s_i) (u_i^T E v_i) (the off-diagonal components of the
    # derivative are orthogonal to G), |.| <= alpha max_i |s_i f'(s_i)| sqrt(n) ||E||_F, relative to
    # ||G||_* = alpha sum s_i: u sqrt(n) max_i |s_i f'(s_i)| ||s||_2 / ||s||_1 (max |s f'| = 0.23-0.49 here);
    # plus 4 eps32 for the fp32 arithmetic. Tolerance 4.1-5.4 eps32; measured 0.02-0.68 eps32 (at most 1.04
    # eps32 over 25 spectra and shapes up to condition number 1e6).
    if kind == "lowrank":
        g = torch.Generator().manual_seed(5)
        m, n = shape
        G = (10 * torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)
             + 0.01 * torch.randn(m, n, generator=g))
    else:
        G = recipe_input(kind, shape, seed=3)
    sigma = torch.linalg.svdvals(G.double())
    s, _ = scaled_singular_values(G)
    nuclear = sigma.sum().item()
    predicted = (sigma * recipe_map(s)).sum().item()
    gap = 1 - predicted / nuclear
    worst = 1 - recipe_map(torch.logspace(math.log10(EPS32), 0, 100001, dtype=torch.float64)).min().item()
    assert 0.271 < worst < 0.273 and 0 <= gap <= worst
    lo, hi = {"gauss": (0.07, 0.12), "cond1e4": (0.16, 0.17), "lowrank": (0.25, worst)}[kind]
    assert lo < gap < hi  # the measured gaps above
    got = (G.double() * qdwh_ns(G).double()).sum().item()
    ss = s.clone().requires_grad_()
    slope, = torch.autograd.grad(recipe_map(ss).sum(), ss)
    tol = EPS32 / 2 * math.sqrt(len(s)) * (s * slope).abs().max().item() * (s.norm() / s.sum()).item() + 4 * EPS32
    assert abs(got - predicted) / nuclear <= tol, (abs(got - predicted) / nuclear / EPS32, tol / EPS32)
    # converged QDWH, for contrast: the nuclear norm to fp32 rounding
    assert abs((G.double() * qdwh(G).double()).sum().item() / nuclear - 1) < 1e-6


def test_qdwh_ns_fp64_applies_its_scalar_map():
    # fp64 input: the working dtype's eps is l0 (as the reference, which takes eps of the input's dtype), so it
    # is another recipe (c = 1.1e21, then ...): its own scalar map, to fp64 rounding
    G = with_singular_values(torch.logspace(0, -4, 24, dtype=torch.float64), 48, 24, seed=2)
    s, _ = scaled_singular_values(G)
    eps64 = torch.finfo(torch.float64).eps
    expected = recipe_map(s, l0=eps64).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(qdwh_ns(G)), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(qdwh_ns(G), recipe_fp64(G, l0=eps64), rtol=0, atol=1e-12)


def test_qdwh_ns_default_steps_and_schedule():
    # the reference's inner_steps = 2: both iterations have c > 100 (the QR form there), then the polish
    assert inspect.signature(qdwh_ns).parameters["steps"].default == 2
    assert [c for _, _, c in _qdwh_schedule(EPS32, 2)] == [pytest.approx(2.7057e9, rel=1e-4),
                                                           pytest.approx(576.78, rel=1e-4)]
    G = torch.randn(40, 24, generator=torch.Generator().manual_seed(3))
    O = qdwh_ns(G, steps=2)
    for other in (qdwh_ns(G), orthogonalize(G, "qdwh_ns"), orthogonalize(G, "qdwh_ns", None, torch.float32),
                  orthogonalize_many([G], "qdwh_ns")[0]):
        assert torch.equal(other, O)
    assert not torch.equal(qdwh_ns(G, steps=1), O)
    # steps >= 4 (fp32): converged QDWH, then the polish, which leaves an orthogonal factor in place
    assert (qdwh_ns(G, steps=4).double() - polar_svd(G.double())).abs().max().item() < 1e-5


def frozen_qdwh(G: torch.Tensor, max_iter: int = 10, dtype: torch.dtype | None = None) -> torch.Tensor:
    """optimizers/ortho.py's qdwh as of commit 264df8b, verbatim but for names: the converged back-end must keep
    its results bit for bit (qdwh_ns was factored out of it)."""
    work = torch.float64 if torch.float64 in (G.dtype, dtype) else torch.float32
    X = G.to(work)
    wide = X.size(-2) < X.size(-1)
    if wide:
        X = X.mT.contiguous()
    n = X.size(-1)
    one = X.abs().sum(-2).amax(-1, keepdim=True)[..., None]
    inf = X.abs().sum(-1).amax(-1, keepdim=True)[..., None]
    X = X / torch.where(one * inf > 0, (one * inf).sqrt(), torch.ones_like(one))
    for a, b, c in _qdwh_schedule(torch.finfo(work).eps, max_iter):
        e = b / c
        if c > 100 and work == torch.float64:
            eye = torch.eye(n, dtype=work, device=X.device).expand(*X.shape[:-2], n, n)
            Q, _ = torch.linalg.qr(torch.cat([math.sqrt(c) * X, eye], dim=-2))
            m = X.size(-2)
            Z = Q[..., :m, :] @ Q[..., m:, :].mT / math.sqrt(c)
        else:
            Y = X.double() if c > 100 else X
            A = (Y.mT @ Y).mul_(c).add_(torch.eye(n, dtype=Y.dtype, device=Y.device))
            Z = (Y @ torch.cholesky_inverse(torch.linalg.cholesky(A))).to(work)
        X = e * X + (a - e) * Z
    return X.mT if wide else X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qdwh_is_unchanged(dtype):
    g = torch.Generator().manual_seed(8)
    for shape in [(64, 32), (32, 64), (48, 48), (3, 40, 24), (4, 128, 512)]:
        G = torch.randn(*shape, generator=g, dtype=dtype)
        for max_iter in (2, 3, 10):
            assert torch.equal(qdwh(G, max_iter=max_iter), frozen_qdwh(G, max_iter=max_iter)), (shape, max_iter)
        assert torch.equal(orthogonalize(G, "qdwh", dtype=torch.float32), frozen_qdwh(G).to(dtype))
