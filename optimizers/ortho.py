"""Orthogonalization back-ends shared by every matrix optimizer: polar(G) = U V^T for G = U S V^T.

    newton_schulz   Keller Jordan's quintic Newton-Schulz (NS5), bf16-friendly, singular values ~[0.68, 1.13]
    polar_express   Amsel et al. 2025 (arXiv:2505.16932): one minimax quintic per step, -> 1 in 8 steps
    qdwh            dynamically weighted Halley (Nakatsukasa, Bai & Gygi 2010), fp32/fp64, exact to rounding
    qdwh_ns         PolarGrad's recipe (timlautk/polargrad): `steps` QDWH iterations (default 2) from the same
                    start, then one cubic Newton-Schulz polish; fp32/fp64; not converged, as the authors
                    run it: singular values in [0.73, 1] for sigma >= eps sqrt(||G||_1 ||G||_inf)
    polar_svd       U V^T from torch.linalg.svd, the reference

`orthogonalize(G, method=...)` dispatches by name and returns G's dtype; `orthogonalize_many` stacks
same-shape matrices into one batched call (NS5 on the 16 hidden matrices of the tiny GPT-2, 2-core CPU:
5.3 ms batched vs 10.2 ms one by one in bf16, 12.3 vs 17.9 ms in fp32). `compute_dtype` picks the
iteration dtype by measurement (bf16 only where bf16 matmuls are fast).

    python -c "import torch; from optimizers.ortho import orthogonalize; \
print(torch.linalg.svdvals(orthogonalize(torch.randn(64, 32), 'qdwh')))"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from runtime.device import bf16_is_fast

# Keller Jordan's NS5 coefficients: a steep slope at 0 (3.4445) bought by not converging to 1; after 5 steps
# [0.01, 1] maps into ~[0.68, 1.13] (docs/optimizers.md 1.2), which his experiments found harmless.
KELLER = (3.4445, -4.7750, 2.0315)

# Polar Express paper list (l = 1e-3, cushion 0.02; docs/optimizers.md 1.8), raw values: the safety factor is
# applied in polar_express(). The last triple is the classical convergent quintic, repeated past the list.
POLAR_EXPRESS_COEFFS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

METHODS = ("ns", "polar_express", "qdwh", "qdwh_ns", "svd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def compute_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The dtype NS/Polar Express iterate in: "auto" = bf16 where bf16 matmuls are fast on `device`
    (CUDA with bf16; on CPU only when measured so, runtime/device.py), fp32 otherwise."""
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(torch.device(device)) else torch.float32
    if problem := dtype_problem(dtype):
        raise ValueError(f"dtype: {problem}")
    return DTYPES[dtype]


def dtype_problem(dtype: str) -> str | None:
    """Why `dtype` names no iteration dtype ("auto" or a DTYPES key), or None: a spec knob's check."""
    return None if dtype == "auto" or dtype in DTYPES else f"{dtype!r} is not auto, {', '.join(DTYPES)}"


def _odd_quintic_iteration(G: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], norm_scale: float,
                           eps: float, dtype: torch.dtype) -> torch.Tensor:
    """X <- a X + b (X X^T) X + c (X X^T)^2 X for each (a, b, c), after X = G / (||G||_F * norm_scale + eps).

    The Frobenius norm bounds the spectral norm, so every singular value starts in [0, 1]. Works on the
    wide orientation so the Gram matrix X X^T is the small side; (..., m, n) batches over leading dims.
    """
    X = G.to(dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * norm_scale + eps)
    # addmm/baddbmm fuse the scaling into the matmul (one rounding in bf16), as torch.optim.Muon does
    batched = X.ndim > 2
    lead = X.shape[:-2]
    if batched:
        X = X.reshape(-1, *X.shape[-2:])
    addmm = torch.baddbmm if batched else torch.addmm
    for a, b, c in coeffs:
        A = X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = addmm(X, B, X, beta=a)  # a X + B X
    if batched:
        X = X.reshape(*lead, *X.shape[-2:])
    return X.mT if tall else X


def newton_schulz(G: torch.Tensor, steps: int = 5, coeffs: tuple[float, float, float] = KELLER,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Keller Jordan's Newton-Schulz quintic, `steps` times with fixed (a, b, c); returns `dtype`.

    The result is ~U S' V^T with S' in ~[0.68, 1.13] for singular values >= 1% of ||G||_F (docs/optimizers.md 1.2).
    """
    return _odd_quintic_iteration(G, [tuple(coeffs)] * steps, 1.0, eps, dtype)


def polar_express(G: torch.Tensor, steps: int = 5, safety: float = 1.01, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Polar Express (Amsel et al. 2025, Algorithm 1): the paper's per-step quintics; returns `dtype`.

    All but the last listed triple are divided by (s, s^3, s^5), s = `safety`, and the input by ||G||_F * s,
    so rounding cannot push a singular value past the interval each polynomial was fitted on.
    """
    listed = [(a / safety, b / safety**3, c / safety**5) for a, b, c in POLAR_EXPRESS_COEFFS[:-1]]
    listed.append(POLAR_EXPRESS_COEFFS[-1])
    coeffs = [listed[min(t, len(listed) - 1)] for t in range(steps)]
    return _odd_quintic_iteration(G, coeffs, safety, eps, dtype)


def _qdwh_weights(lower: float) -> tuple[float, float, float, float]:
    """Dynamic weights (a, b, c) for the current lower bound l of the singular values, and the next bound
    (Nakatsukasa, Bai & Gygi 2010, eqs. 3.3-3.5): the rational map x (a + b x^2) / (1 + c x^2) is optimal on [l, 1].
    """
    l2 = lower * lower
    d = (4.0 * (1.0 - l2) / (l2 * l2)) ** (1.0 / 3.0)
    sqd = math.sqrt(1.0 + d)
    a = sqd + 0.5 * math.sqrt(8.0 - 4.0 * d + 8.0 * (2.0 - l2) / (l2 * sqd))
    b = (a - 1.0) ** 2 / 4.0
    c = a + b - 1.0
    return a, b, c, min(lower * (a + b * l2) / (1.0 + c * l2), 1.0)


def _qdwh_schedule(eps: float, max_iter: int) -> list[tuple[float, float, float]]:
    """(a, b, c) of each QDWH iteration from l0 = eps until the bound reaches 1 (to 10 eps), at most max_iter.
    The weights depend on l0 alone, so the iteration count is known before any arithmetic: 4 in fp32, 6 in fp64."""
    out, lower = [], eps
    while len(out) < max_iter:
        a, b, c, lower = _qdwh_weights(lower)
        out.append((a, b, c))
        if 1.0 - lower < 10 * eps:
            break
    return out


def qdwh(G: torch.Tensor, max_iter: int = 10, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Polar factor by QDWH in fp32 (fp64 if G or `dtype` is fp64); (..., m, n) batched.

    X0 = G / sqrt(||G||_1 ||G||_inf) (an upper bound of ||G||_2) and lower bound l0 = machine epsilon, as
    JAX's lax.linalg.qdwh: the weights then depend only on l0, so one schedule serves the whole batch and the
    iteration count is fixed in advance (no convergence test, so no host sync): it runs until the bound l is 1
    to 10 eps (4 iterations in fp32, 6 in fp64), or `max_iter`. JAX runs one more, to see the change fall under
    a tolerance; on Gaussian, low-rank-plus-noise and log-spaced spectra up to condition 1e6 that extra
    iteration changed no error measurably (it helps only singular values below eps, which fp32 cannot resolve).
    Iteration: X <- (b/c) X + (a - b/c) X (I + c X^T X)^-1. While c > 100, I + c X^T X has condition number up
    to 1 + c (2.7e9 in fp32's first step): in fp32 work it is formed and Cholesky-factored in fp64, whose
    forward error c * 1.1e-16 stays near fp32's rounding (measured on condition numbers 1e2-1e6: 2-25x smaller
    errors than the fp32 QR form, tests/test_ortho.py; and faster). In fp64 work the QR of [sqrt(c) X; I] does
    it, as in the paper. (So two of the four fp32 iterations run fp64 matmuls, at 40% of the fp32 rate on this
    CPU, 1.02 vs 0.41 ms for four 512 x 128 Grams; GPUs with cut-down fp64 will be slow there, not measured.)
    Once c <= 100 the matrix is well conditioned (kappa <= 101) and its explicit inverse from the Cholesky
    factor is accurate: one Gram, one n x n factorization and inverse, one matmul per iteration, the FLOPs of
    a Newton-Schulz step.
    """
    X, work, wide = _qdwh_start(G, dtype)
    X = _qdwh_iterate(X, _qdwh_schedule(torch.finfo(work).eps, max_iter))
    return X.mT if wide else X


def _qdwh_start(G: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.dtype, bool]:
    """QDWH's X0 = G / sqrt(||G||_1 ||G||_inf) in the working dtype (fp64 if G or `dtype` is, else fp32), on
    the tall orientation (laid out as such); returns (X0, working dtype, whether G was wide)."""
    work = torch.float64 if torch.float64 in (G.dtype, dtype) else torch.float32
    X = G.to(work)
    wide = X.size(-2) < X.size(-1)
    if wide:  # the Gram / QR side must be the small one: work on the tall orientation, laid out as such
        X = X.mT.contiguous()  # (the transposed view makes every product here ~1.5x slower)
    one = X.abs().sum(-2).amax(-1, keepdim=True)[..., None]  # ||X||_1: max column sum
    inf = X.abs().sum(-1).amax(-1, keepdim=True)[..., None]  # ||X||_inf: max row sum
    return X / torch.where(one * inf > 0, (one * inf).sqrt(), torch.ones_like(one)), work, wide


def _qdwh_iterate(X: torch.Tensor, schedule: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """The QDWH iterations X <- (b/c) X + (a - b/c) X (I + c X^T X)^-1 for each (a, b, c) of `schedule`, on a
    tall (..., m, n) X in fp32 or fp64 (the forms of each step: qdwh's docstring)."""
    work = X.dtype
    n = X.size(-1)
    for a, b, c in schedule:
        e = b / c
        if c > 100 and work == torch.float64:
            eye = torch.eye(n, dtype=work, device=X.device).expand(*X.shape[:-2], n, n)
            Q, _ = torch.linalg.qr(torch.cat([math.sqrt(c) * X, eye], dim=-2))
            m = X.size(-2)
            Z = Q[..., :m, :] @ Q[..., m:, :].mT / math.sqrt(c)
        else:
            Y = X.double() if c > 100 else X
            A = (Y.mT @ Y).mul_(c).add_(torch.eye(n, dtype=Y.dtype, device=Y.device))
            Z = (Y @ torch.cholesky_inverse(torch.linalg.cholesky(A))).to(work)  # X (I + c X^T X)^-1
        X = e * X + (a - e) * Z
    return X


def qdwh_ns(G: torch.Tensor, steps: int = 2, dtype: torch.dtype | None = None,
            fp64_above: float | None = None) -> torch.Tensor:
    """The PolarGrad reference's polar factor (timlautk/polargrad's default and its experiments, inner_steps 2):
    the first `steps` QDWH iterations, no convergence test, then always one cubic Newton-Schulz polish
    X <- 1.5 X - 0.5 X (X^T X). fp32 (fp64 if G or `dtype` is fp64), (..., m, n) batched, wide inputs by
    transposition; qdwh's start X0 = G / sqrt(||G||_1 ||G||_inf), l0 = eps of the working dtype (fp32's for
    fp32 gradients, as the reference) and weights, so steps >= 4 in fp32 is converged QDWH plus the polish.

    Not converged: each singular value s of X0 ends at f(s), f the composition of the iterations' rational
    maps and of 1.5 x - 0.5 x^3. With 2 fp32 steps (c = 2.7e9, then 577) f takes [eps, 1] into [0.728, 1]
    (oscillating: the QDWH maps are minimax rationals) and f -> 0 below eps, so the nuclear-norm scale
    <G, qdwh_ns(G)> = sum s_i f(s_i) is 0.73-0.93 of ||G||_* (Gaussian 0.89-0.92, condition 1e4 0.83,
    low-rank plus noise 0.73; tests/test_ortho.py checks the fp32 result against sum s_i f(s_i)).

    Precision: an iteration with c > `fp64_above` (default 1/sqrt(eps) = 2896 in fp32: the first, where
    I + c X^T X has condition number up to 1 + c = 2.7e9) runs in fp64 (Gram, Cholesky inverse, product) and
    hands its output on in fp64; the second (condition number <= 578) runs in fp32. Each update is one
    product X H, H = (b/c) I + (a - b/c) (I + c X^T X)^-1. Max entry error against an fp64 QR-form evaluation
    of the recipe on the same fp32 input (tests/test_ortho.py's recipe_fp64; 3 seeds x 256x64, 64x256,
    128x128, 512x128, 128x512; measured 2026-12-01): 2.7e-7 on Gaussian input, 6.0e-6 at condition number 1e4
    (both iterations in fp64, fp64_above=100: 7.0e-8 and 6.0e-6; the reference's form, an fp32 QR per
    iteration: 2.6e-7 and 1.6e-4). The first iteration's products in fp32 after an fp64 factorization reach
    1.0e-3 at condition 1e4 (that iteration amplifies errors). Cost: docs/results.md, "Step cost".
    """
    X, work, wide = _qdwh_start(G, dtype)
    schedule = _qdwh_schedule(torch.finfo(work).eps, steps)
    if work == torch.float64:
        X = _qdwh_iterate(X, schedule)
    else:
        above = 1 / math.sqrt(torch.finfo(work).eps) if fp64_above is None else fp64_above
        for a, b, c in schedule:
            e = b / c
            Y = X.to(torch.float64 if c > above else work)
            eye = torch.eye(X.size(-1), dtype=Y.dtype, device=Y.device)
            H = torch.cholesky_inverse(torch.linalg.cholesky((Y.mT @ Y).mul_(c).add_(eye)))
            H = H.mul_(a - e).add_(eye, alpha=e)
            X = Y @ H  # (b/c) Y + (a - b/c) Y (I + c Y^T Y)^-1
        X = X.to(work)
    X = _ns_polish(X)
    return X.mT if wide else X


def _ns_polish(X: torch.Tensor) -> torch.Tensor:
    """One cubic Newton-Schulz step X <- 1.5 X - 0.5 X (X^T X) on a tall (..., m, n) X: one fused baddbmm."""
    Y = X.reshape(-1, *X.shape[-2:])
    return torch.baddbmm(Y, Y, Y.mT @ Y, beta=1.5, alpha=-0.5).reshape(X.shape)


def polar_svd(G: torch.Tensor) -> torch.Tensor:
    """U V^T from the thin SVD (fp32, or fp64 for fp64 input): the reference for tests and small problems."""
    work = torch.float64 if G.dtype == torch.float64 else torch.float32
    U, _, Vh = torch.linalg.svd(G.to(work), full_matrices=False)
    return U @ Vh


def orthogonalize(G: torch.Tensor, method: str = "ns", steps: int | None = None,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """polar(G) by `method`, returned in G's dtype.

    `steps`: NS / Polar Express iterations (default 5), QDWH's maximum iterations (default 10), qdwh_ns's
    QDWH iterations before its polish (default 2), unused by svd. `dtype`: the iteration dtype of ns /
    polar_express; qdwh, qdwh_ns and svd run in fp32 (fp64 if asked), since torch has no bf16 QR, Cholesky
    or SVD.
    """
    if method == "ns":
        out = newton_schulz(G, steps=5 if steps is None else steps, dtype=dtype)
    elif method == "polar_express":
        out = polar_express(G, steps=5 if steps is None else steps, dtype=dtype)
    elif method == "qdwh":
        out = qdwh(G, max_iter=10 if steps is None else steps, dtype=dtype)
    elif method == "qdwh_ns":
        out = qdwh_ns(G, steps=2 if steps is None else steps, dtype=dtype)
    elif method == "svd":
        out = polar_svd(G.to(torch.float64) if dtype == torch.float64 else G)
    else:
        raise ValueError(f"orthogonalize: unknown method {method!r} (known: {', '.join(METHODS)})")
    return out.to(G.dtype)


# Matrices this process has orthogonalized (all methods): with the work shared across ranks, each rank's count
# is its share. Read by tests (tests/test_distributed.py); reset freely.
ORTHOGONALIZED = {"matrices": 0}
# Share the orthogonalization across the ranks of the default process group (data-parallel runs, where every
# rank holds the same directions after the gradient all-reduce). Off: every rank does all of it.
SHARE_ACROSS_RANKS = True


def _share() -> tuple[int, int] | None:
    """(rank, world size) when the work is shared across processes, else None."""
    if SHARE_ACROSS_RANKS and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _orthogonalize_stack(Gs: Sequence[torch.Tensor], method: str, steps: int | None,
                         dtype: torch.dtype) -> list[torch.Tensor]:
    """Same-shape matrices in one batched call (a single one alone, unstacked)."""
    ORTHOGONALIZED["matrices"] += len(Gs)
    if len(Gs) == 1:
        return [orthogonalize(Gs[0], method, steps, dtype)]
    return list(orthogonalize(torch.stack(list(Gs)), method, steps, dtype).unbind(0))


def orthogonalize_many(Gs: Sequence[torch.Tensor], method: str = "ns", steps: int | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """orthogonalize() of each matrix, in order; matrices of one shape, dtype and device go in one batched
    call. In a multi-process run (torch.distributed initialized, world size W > 1) each same-shape bucket is
    cut into W contiguous shares: rank r orthogonalizes share r only, then one all_gather per bucket gives
    every rank all the results (modded-nanogpt's distributed Muon, by shape instead of by parameter)."""
    buckets: dict[tuple, list[int]] = {}
    for i, G in enumerate(Gs):
        buckets.setdefault((tuple(G.shape), G.dtype, G.device), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(Gs)
    shared = _share()
    for idx in buckets.values():
        if shared is None:
            for i, O in zip(idx, _orthogonalize_stack([Gs[i] for i in idx], method, steps, dtype)):
                out[i] = O
            continue
        rank, world = shared
        per = -(-len(idx) // world)  # ceil: every rank sends `per` matrices (zeros pad the last shares)
        mine = idx[rank * per:(rank + 1) * per]
        send = torch.zeros((per, *Gs[idx[0]].shape), dtype=Gs[idx[0]].dtype, device=Gs[idx[0]].device)
        if mine:
            send[:len(mine)] = torch.stack(_orthogonalize_stack([Gs[i] for i in mine], method, steps, dtype))
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send)
        for i, O in zip(idx, torch.cat(parts).unbind(0)):
            out[i] = O
    return out
