"""The shared orthogonalization back-ends against their scalar maps and the SVD polar factor (optimizers.md
section 8.1), the batched helper against one-by-one calls, and the measured dtype choice."""

import pytest
import torch

from harness.device import bf16_is_fast
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
)


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
    # optimizers.md 1.2: Keller's coefficients deliberately stop in ~[0.68, 1.13], never converging to 1
    y = quintic(torch.logspace(-2, 0, 4001, dtype=torch.float64), [KELLER] * 5)
    assert 0.68 <= y.min().item() < 0.69 and 1.13 < y.max().item() <= 1.135


@pytest.mark.parametrize("steps, lo, hi", [(5, 0.84, 1.124), (8, 1 - 1e-12, 1 + 1e-12)])
def test_polar_express_scalar_map_range(steps, lo, hi):
    # optimizers.md 1.8: [0.84, 1.12] after 5 steps (measured max 1.1236), 1.0000 after 8, for sigma >= 1e-3
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
    for method in ("ns", "polar_express", "qdwh"):
        assert torch.equal(orthogonalize(Z, method, dtype=torch.float32), Z)


def test_orthogonalize_many_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    Gs = [torch.randn(*s, generator=g, dtype=torch.float64) for s in [(16, 8), (8, 16), (16, 8), (5, 5), (16, 8)]]
    for method in ("ns", "polar_express", "qdwh", "svd"):
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
