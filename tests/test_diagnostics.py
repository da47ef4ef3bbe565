"""Diagnostics (harness/probes/diagnostics.py): every spectral statistic against closed forms on synthetic matrices,
the curvature probes against the exact Hessian of a tiny model (torch.autograd.functional.hessian), and
training with diagnostics on bit-identical (CPU) to training with them off, including across a resume."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_jsonl, run_train
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.probes.diagnostics import (
    HVP,
    Diagnostics,
    DiagnosticsConfig,
    block_offdiag_share,
    hidden_matrices,
    hutchinson_trace,
    noise_stats,
    role_means,
    spectral_stats,
    step_curvature,
    top_algebraic_eigenvalue,
    top_eigenvalue,
    update_stats,
)
from models import ROLE_GROUP, ModelConfig, build_model
from optimizers.groups import split_parameters


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def with_spectrum(s: list[float], m: int, n: int) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthogonal U (m x m) and V (n x n)."""
    d = torch.zeros(m, n, dtype=torch.float64)
    d[range(len(s)), range(len(s))] = torch.tensor(s, dtype=torch.float64)
    return orthogonal(m, 1) @ d @ orthogonal(n, 2).T


def stats_of(m: torch.Tensor) -> dict:
    return spectral_stats(torch.linalg.svdvals(m))


# ---- closed forms -------------------------------------------------------------------------------------------

def test_identity():
    s = stats_of(torch.eye(7, dtype=torch.float64))
    assert s["top_sv"] == pytest.approx(1.0)
    assert s["stable_rank"] == pytest.approx(7.0)
    assert s["eff_rank"] == pytest.approx(7.0)  # uniform spectrum: entropy log 7
    assert s["nuc_over_fro"] == pytest.approx(math.sqrt(7))


def test_rank_one():
    u, v = torch.randn(9, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s = stats_of(3.0 * torch.outer(u, v))
    assert s["top_sv"] == pytest.approx(3.0 * u.norm().item() * v.norm().item())
    assert s["stable_rank"] == pytest.approx(1.0)
    assert s["eff_rank"] == pytest.approx(1.0, abs=1e-6)  # round-off singular values ~1e-16 add ~1e-14
    assert s["nuc_over_fro"] == pytest.approx(1.0)


def test_known_spectrum():
    s = stats_of(with_spectrum([4.0, 3.0], 6, 5))  # singular values 4, 3, 0, 0, 0
    p = torch.tensor([4 / 7, 3 / 7], dtype=torch.float64)
    assert s["top_sv"] == pytest.approx(4.0)
    assert s["stable_rank"] == pytest.approx(25 / 16)
    assert s["nuc_over_fro"] == pytest.approx(7 / 5)
    assert s["eff_rank"] == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)
    geometric = stats_of(with_spectrum([2.0**-k for k in range(5)], 5, 5))
    assert geometric["stable_rank"] == pytest.approx(sum(4.0**-k for k in range(5)))


def test_zero_matrix_has_no_ranks():
    s = stats_of(torch.zeros(4, 3))
    assert s == {"top_sv": 0.0, "stable_rank": None, "eff_rank": None, "nuc_over_fro": None}


def test_update_stats_of_an_orthogonal_step():
    """W <- W - lr Q with Q orthogonal (an exact Muon step): RMS lr / sqrt(n), RMS/lr 1/sqrt(n), full rank,
    cos with the gradient Q exactly 1, |U| / |W| = lr sqrt(n) / |W|."""
    n, lr = 6, 0.1
    w, q = torch.randn(n, n, dtype=torch.float64), orthogonal(n, 3)
    st = update_stats(w, w - lr * q, 3.0 * q, lr)
    assert st["update_rms"] == pytest.approx(lr / math.sqrt(n))
    assert st["update_rms_per_lr"] == pytest.approx(1 / math.sqrt(n))
    assert st["cos_update_grad"] == pytest.approx(1.0)
    assert st["update_to_weight"] == pytest.approx(lr * math.sqrt(n) / w.norm().item())
    assert st["update_top_sv"] == pytest.approx(lr)
    assert st["update_stable_rank"] == pytest.approx(n)
    assert st["update_eff_rank"] == pytest.approx(n)
    assert st["update_nuc_over_fro"] == pytest.approx(math.sqrt(n))
    after = stats_of(w - lr * q)
    assert st["weight_spectral_norm"] == pytest.approx(after["top_sv"])
    assert st["weight_stable_rank"] == pytest.approx(after["stable_rank"])
    assert update_stats(w, w - lr * q, -q, lr)["cos_update_grad"] == pytest.approx(-1.0)  # an ascent step
    assert update_stats(w, w, q, lr)["update_stable_rank"] is None  # no update: no rank


def test_noise_stats_closed_form():
    """Pieces g1 = (3, 1), g2 = (1, 3): mean (2, 2), |mean|^2 = 8, s^2 = |g1 - g2|^2 / 2 = 4, noise/signal 0.5,
    unbiased |G|^2 = 8 - 4/2 = 6, B = tokens * 4 / 6."""
    g = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    st = noise_stats(g.sum(0), float(g.square().sum()), 2, piece_tokens=300)
    assert st["grad_var"] == pytest.approx(4.0)
    assert st["grad_mean_sq"] == pytest.approx(8.0)
    assert st["noise_to_signal"] == pytest.approx(0.5)
    assert st["noise_scale_tokens"] == pytest.approx(300 * 4 / 6)
    same = torch.tensor([[1.0, 2.0]] * 3)  # identical pieces: no noise
    assert noise_stats(same.sum(0), float(same.square().sum()), 3, 10)["noise_to_signal"] == pytest.approx(0.0)
    opposite = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # signal estimate 0.5 - 1/2 = 0: no noise scale
    assert noise_stats(opposite.sum(0), 2.0, 2, 10)["noise_scale_tokens"] is None


def test_role_means():
    m = {"L0.attn_q": {"role": "attn_q", "layer": 0, "x": 1.0}, "L1.attn_q": {"role": "attn_q", "layer": 1, "x": 3.0},
         "L0.mlp_up": {"role": "mlp_up", "layer": 0, "x": 5.0, "y": None}}
    r = role_means(m)
    assert r["attn_q"]["x"] == 2.0 and r["mlp_up"]["x"] == 5.0 and r["all"]["x"] == 3.0 and "layer" not in r["all"]


# ---- curvature against the exact Hessian ----------------------------------------------------------------------

def tiny_model(pc_level: int = 0):
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt2", n_layer=1, n_head=2, d_model=4, vocab_size=8, block_size=4, pc_level=pc_level)
    model = build_model(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 8, (3, 4), generator=g), torch.randint(0, 8, (3, 4), generator=g)
    return model, x, y


@pytest.fixture(scope="module")
def exact():
    """The tiny model's exact Hessian (n x n, n ~ 300) and an HVP operator on the same loss."""
    model, x, y = tiny_model()
    names = [n for n, p in model.named_parameters()]
    params = [p for p in model.parameters()]
    shapes = [p.shape for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def loss_of(flat):
        tensors, i = {}, 0
        for name, shape in zip(names, shapes):
            tensors[name] = flat[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return torch.func.functional_call(model, tensors, (x, y))[1]

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.autograd.functional.hessian(loss_of, flat0)
        hvp = HVP(model(x, y)[1], params)
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP)
    group_of = {id(i.param): g for g in ("hidden", "embedding", "head", "gain_bias") for i in split.infos(g)}
    blocks = list(dict.fromkeys(group_of[id(p)] for p in params))
    block_of = [blocks.index(group_of[id(p)]) for p in params]
    return {"H": hessian, "hvp": hvp, "params": params, "block_of": block_of, "model": model, "x": x, "y": y}


def flat(vs):
    return torch.cat([v.flatten() for v in vs])


def test_hvp_equals_exact_hessian_product(exact):
    v = [torch.randn(p.shape, dtype=torch.float64) for p in exact["params"]]
    assert torch.allclose(flat(exact["hvp"](v)), exact["H"] @ flat(v), rtol=1e-6, atol=1e-7)  # float64; H up to ~20


def test_power_iteration_finds_the_top_eigenvalue(exact):
    eig = torch.linalg.eigvalsh(exact["H"])
    top = eig[eig.abs().argmax()].item()
    lam, iters, converged = top_eigenvalue(exact["hvp"], exact["params"], torch.Generator().manual_seed(0), 3000, 1e-12)
    assert converged and iters < 3000
    assert lam == pytest.approx(top, rel=1e-6)


def quadratic(eigs: list[float], seed: int = 0):
    """f(w) = ½ wᵀAw - bᵀw with A = Q diag(eigs) Qᵀ: its HVP is A exactly, at any w."""
    q = orthogonal(len(eigs), seed)
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    b = torch.randn(len(eigs), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a, b, q


def hvp_at(a, b, w):
    w = w.clone().requires_grad_(True)
    return HVP(0.5 * w @ a @ w - b @ w, [w]), w


def test_sharpness_is_the_largest_eigenvalue_not_the_largest_magnitude():
    a, b, _ = quadratic([-5.0, 3.0, 1.0, 0.5, -0.2])
    hvp, w = hvp_at(a, b, torch.zeros(5, dtype=torch.float64))
    out = top_algebraic_eigenvalue(hvp, [w], torch.Generator().manual_seed(0), 2000, 1e-12)
    assert out["lambda_abs_max"] == pytest.approx(-5.0, rel=1e-6)
    assert out["lambda_max"] == pytest.approx(3.0, rel=1e-6) and out["power_converged"]
    a2, b2, _ = quadratic([4.0, -1.0, 0.5])
    hvp2, w2 = hvp_at(a2, b2, torch.zeros(3, dtype=torch.float64))
    pos = top_algebraic_eigenvalue(hvp2, [w2], torch.Generator().manual_seed(0), 2000, 1e-12)
    assert pos["lambda_max"] == pos["lambda_abs_max"] == pytest.approx(4.0, rel=1e-6)


def test_step_curvature_ratio_is_gd_stability_ratio():
    """Gradient descent w1 = w0 - lr g0 on a quadratic: the ratio is lr g0ᵀAg0 / (2 |g0|^2), and lr lambda / 2
    when g0 is an eigenvector; > 1 exactly when the step passes the line minimum."""
    a, b, q = quadratic([10.0, 2.0, 0.5, 0.1])
    w0 = torch.randn(4, dtype=torch.float64)
    g0 = a @ w0 - b
    for lr in (0.05, 0.3):
        hvp, w1 = hvp_at(a, b, w0 - lr * g0)
        out = step_curvature(hvp, [(w1 - w0).detach()], [g0])
        assert out["step_curvature_ratio"] == pytest.approx(lr * (g0 @ a @ g0).item() / (2 * g0.square().sum().item()))
        assert out["step_sharpness"] == pytest.approx((g0 @ a @ g0).item() / g0.square().sum().item())
    w_eig = torch.linalg.solve(a, b) + q[:, 0]  # the gradient there is A q0 = 10 q0
    hvp, w1 = hvp_at(a, b, w_eig - 0.3 * 10.0 * q[:, 0])
    assert step_curvature(hvp, [(w1 - w_eig).detach()], [10.0 * q[:, 0]])["step_curvature_ratio"] == pytest.approx(1.5)
    hvp, w1 = hvp_at(a, b, w0 + 0.1 * g0)  # an ascent step: no ratio
    assert step_curvature(hvp, [(w1 - w0).detach()], [g0])["step_curvature_ratio"] is None


def test_hutchinson_trace_is_unbiased(exact):
    trace = torch.trace(exact["H"]).item()
    est, se = hutchinson_trace(exact["hvp"], exact["params"], torch.Generator().manual_seed(0), 400)
    # Rademacher: Var(zᵀHz) = 2 sum_{i != j} H_ij^2, so the standard error is known exactly
    off = exact["H"] - torch.diag(torch.diag(exact["H"]))
    true_se = math.sqrt(2 * off.square().sum().item() / 400)
    assert se == pytest.approx(true_se, rel=0.25)
    assert abs(est - trace) < 4 * true_se


def test_block_offdiag_share_against_exact(exact):
    h, block_of = exact["H"], exact["block_of"]
    ids = torch.cat([torch.full((p.numel(),), b) for p, b in zip(exact["params"], block_of)])
    same = ids[:, None] == ids[None, :]
    share = 1 - h[same].square().sum().item() / h.square().sum().item()
    assert 0.05 < share < 0.95  # a real mixture of in-block and cross-block curvature at this size
    est = block_offdiag_share(exact["hvp"], exact["params"], block_of, torch.Generator().manual_seed(0), 300)
    assert est == pytest.approx(share, abs=0.03)
    per_tensor = list(range(len(exact["params"])))  # blocks = tensors: a finer partition, more off-diagonal
    ids_t = torch.cat([torch.full((p.numel(),), b) for p, b in zip(exact["params"], per_tensor)])
    share_t = 1 - h[ids_t[:, None] == ids_t[None, :]].square().sum().item() / h.square().sum().item()
    assert share_t > share
    assert block_offdiag_share(exact["hvp"], exact["params"], per_tensor, torch.Generator().manual_seed(1),
                               100) == pytest.approx(share_t, abs=0.05)


class ProbeData:
    """The two methods Diagnostics reads from TokenData, over fixed tensors."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def val_batches(self, batch_size):
        yield self.x[:batch_size], self.y[:batch_size]

    def train_batch(self, step, micro, micro_bs, grad_accum, rank=0, world_size=1):
        return self.x[:micro_bs], self.y[:micro_bs]


def recorder(model, x, y, **cfg):
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    t = type("T", (), {"micro_batch_size": 3, "max_steps": 10})()
    d = Diagnostics(DiagnosticsConfig(every=1, **cfg), model, split, opt, ProbeData(x, y), t, 1,
                    torch.device("cpu"), "fp32", path=None, write=False)
    return d, opt


def test_recorder_end_to_end_against_exact(exact):
    """Through the Diagnostics class: the SGD update's geometry (U = -lr g: cos 1, RMS/lr = RMS(g)), the fused
    QKV split into three role entries, lambda_max and the trace against the exact Hessian, the gradient noise
    of 3 one-sequence pieces against per-sequence gradients computed here."""
    model, x, y = tiny_model()
    d, opt = recorder(model, x, y, noise_pieces=3, power_iters=3000, power_tol=1e-12, trace_samples=400,
                      block_samples=50)
    model.train()
    model(x, y)[1].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    d.before_step(1)
    opt.step()
    rec = d.after_step(1, tokens=12)
    keys = sorted(rec["matrices"])
    assert keys == ["L0.attn_k", "L0.attn_out", "L0.attn_q", "L0.attn_v", "L0.mlp_down", "L0.mlp_up"]
    q = rec["matrices"]["L0.attn_q"]
    assert q["shape"] == [4, 4] and q["cos_update_grad"] == pytest.approx(1.0)
    g_q = grads["transformer.h.0.attn.c_attn.weight"][:4]
    assert q["update_rms_per_lr"] == pytest.approx(g_q.norm().item() / 4)  # RMS of g over 16 entries
    # the Hessian at the updated weights
    model2, _, _ = tiny_model()
    model2.load_state_dict(model.state_dict())
    eig = torch.linalg.eigvalsh(hessian_of(model2, x, y))
    h = rec["hessian"]
    assert h["lambda_abs_max"] == pytest.approx(eig[eig.abs().argmax()].item(), rel=1e-5)
    assert h["lambda_max"] == pytest.approx(eig.max().item(), rel=1e-5)  # here the largest |.| is negative
    assert h["sharpness_x_lr_over_2"] == pytest.approx(h["lambda_max"] * 0.5 / 2)
    # the step's curvature against the exact Hessian and gradient at the updated weights
    w_before = torch.cat([p.detach().flatten() for p in tiny_model()[0].parameters()])
    u = torch.cat([p.detach().flatten() for p in model2.parameters()]) - w_before
    hu = hessian_of(model2, x, y) @ u
    g_before = torch.cat([g.flatten() for g in grads.values()])  # the probe batch is the step's batch here
    assert h["step_sharpness"] == pytest.approx((u @ hu).item() / (u @ u).item(), rel=1e-6)
    assert h["step_curvature_ratio"] == pytest.approx((u @ hu).item() / 2 / -(g_before @ u).item(), rel=1e-6)
    assert h["step_descent"] == pytest.approx(0.5 * g_before.square().sum().item())  # -gᵀu = lr |g|^2
    assert abs(h["trace"] - eig.sum().item()) < 4 * h["trace_se"]
    # gradient noise: 3 pieces of one sequence each, at the pre-update weights
    model3, _, _ = tiny_model()
    params = list(model3.parameters())
    per = [torch.cat([g.flatten() for g in torch.autograd.grad(model3(x[i:i + 1], y[i:i + 1])[1], params)])
           for i in range(3)]
    g = torch.stack(per)
    mean = g.mean(0)
    var = (g - mean).square().sum().item() / 2
    assert rec["noise"]["noise_to_signal"] == pytest.approx(var / mean.square().sum().item(), rel=1e-9)
    assert rec["noise"]["pieces"] == 3 and rec["noise"]["piece_tokens"] == 4
    assert model.training  # the probes ran in eval mode and restored train mode


def hessian_of(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(v):
        tensors, i = {}, 0
        for name, shape in zip(names, shapes):
            tensors[name] = v[i:i + shape.numel()].view(shape)
            i += shape.numel()
        return torch.func.functional_call(model.eval(), tensors, (x, y))[1]

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss_of, flat0)


def test_pc_layers_report_the_effective_weight():
    model, x, y = tiny_model(pc_level=2)
    d, opt = recorder(model, x, y, hessian=False, noise=False)
    pcs = {m.key for m in hidden_matrices(model, d_split(model), {}) if m.pc is not None}
    assert pcs == {"L0.attn_out", "L0.mlp_up", "L0.mlp_down"}  # PC layers: FFN and attention output
    model.train()
    model(x, y)[1].backward()
    layer = model.transformer.h[0].mlp.c_fc
    before = layer.effective_weight().detach().clone()
    d.before_step(1)
    opt.step()
    rec = d.after_step(1, tokens=12)
    up = rec["matrices"]["L0.mlp_up"]
    expect = update_stats(before, layer.effective_weight().detach(), None, 0.5)
    assert up["eff_update_rms"] == pytest.approx(expect["update_rms"])
    assert up["eff_weight_stable_rank"] == pytest.approx(expect["weight_stable_rank"])
    assert "eff_update_rms" not in rec["matrices"]["L0.attn_q"]


def d_split(model):
    return split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP)


# ---- training with diagnostics on is training with them off -----------------------------------------------------

CHEAP = ["diagnostics.every=4", "diagnostics.power_iters=4", "diagnostics.trace_samples=2",
         "diagnostics.block_samples=1"]
CASES = {"muon": ["optimizer=muon"], "newton_muon": ["optimizer=newton_muon", "optimizer.refresh_every=3"],
         "adamw_pc": ["optimizer=adamw", "model.pc_level=2"]}


def same_training(a, b):
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_time_s"} for r in rows]
    assert strip(read_jsonl(a / "metrics.jsonl")) == strip(read_jsonl(b / "metrics.jsonl"))
    wa, wb = torch.load(a / "model_final.pt")["state_dict"], torch.load(b / "model_final.pt")["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def launch(run_dir, args, **env):
    return subprocess.Popen([sys.executable, "train.py", "experiment=smoke", f"hydra.run.dir={run_dir}", "logger=none",
                             *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env})


# Newton-Muon and AdamW+PC slow-marked (`make test-all`) to keep the default suite under 15 minutes on the
# slower CI machines; Muon's case stays.
@pytest.mark.parametrize("case", [c if c == "muon" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_diagnostics_leave_training_bit_identical(kjv_dir, tmp_path, case):
    off, on = tmp_path / "off", tmp_path / "on"
    procs = [launch(off, CASES[case]), launch(on, [*CASES[case], *CHEAP])]  # side by side on 2 cores
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    same_training(off, on)
    recs = read_jsonl(on / "diagnostics.jsonl")
    assert [r["step"] for r in recs] == [4, 8, 12]
    assert not (off / "diagnostics.jsonl").exists()
    for r in recs:
        # gpt2 ties its head to the embedding: 3 blocks (hidden, embedding, gain_bias); step 1, trace 2, 1 per block
        assert r["hessian"]["n_blocks"] == 3
        assert r["hessian"]["hvp_calls"] == r["hessian"]["power_iters"] + 1 + 2 + 3
        assert math.isfinite(r["hessian"]["lambda_max"]) and r["noise"]["pieces"] == 2  # smoke: 2 micro-batches
        assert all(r["cost_s"][k] > 0 for k in ("geometry", "noise", "hessian_top", "hessian_step", "hessian_trace",
                                                "hessian_blocks"))
        assert len(r["matrices"]) == 4 * 6  # gpt2_tiny: 4 layers x (q, k, v, out, up, down)
        assert set(r["roles"]) == {"attn_q", "attn_k", "attn_v", "attn_out", "mlp_up", "mlp_down", "all"}
    summary_on = json.loads((on / "summary.json").read_text())
    assert summary_on["diagnostics_time_s"] > 0 and summary_on["diagnostics_every"] == 4
    if case == "adamw_pc":
        assert "eff_update_stable_rank" in recs[0]["matrices"]["L0.mlp_up"]


@pytest.mark.slow  # ~16 s; resume and diagnostics each keep their default-suite tests (`make test-all`)
def test_diagnostics_survive_a_resume(kjv_dir, tmp_path):
    """Killed after step 7 (checkpoint at 6) and relaunched: diagnostics.jsonl is cut back to step 4 and ends
    with the same records as an uninterrupted run (costs aside)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = ["optimizer=muon", "train.ckpt_every=3", *CHEAP]
    procs = [launch(ref, args), launch(cut, args, OPTBENCH_KILL_AT_STEP="7")]
    _, err0 = procs[0].communicate(timeout=600)
    _, err1 = procs[1].communicate(timeout=600)
    assert procs[0].returncode == 0, err0[-3000:]
    assert procs[1].returncode == -signal.SIGKILL, err1[-3000:]
    assert [r["step"] for r in read_jsonl(cut / "diagnostics.jsonl")] == [4]
    relaunch = launch(cut, args)  # the same command (and thread count: 1) again
    out, err = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0 and "resumed from" in out, err[-3000:]
    same_training(ref, cut)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cost_s"} for r in rows]
    a, b = strip(read_jsonl(ref / "diagnostics.jsonl")), strip(read_jsonl(cut / "diagnostics.jsonl"))
    assert [r["step"] for r in b] == [4, 8, 12] and b == a


@pytest.mark.parametrize("override, message", [
    ("diagnostics.every=-1", "diagnostics.every: must be >= 0"),
    ("diagnostics.blocks=rows", "diagnostics.blocks: 'rows' is not group or tensor"),
    ("diagnostics.noise_pieces=1", "diagnostics.noise_pieces: must be >= 2"),
    ("diagnostics.power_iters=0", "diagnostics.power_iters: must be >= 1"),
    ("diagnostics.probes=3", "diagnostics.probes"),
])
def test_bad_diagnostics_config_fails_fast(kjv_dir, tmp_path, override, message):
    proc = run_train(tmp_path / "r", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "r").exists()


def test_noise_pieces_must_divide_a_single_micro_batch(kjv_dir, tmp_path):
    proc = run_train(tmp_path / "r", "diagnostics.every=2", "diagnostics.noise_pieces=3", "train.global_batch_size=4",
                     "train.micro_batch_size=4", check=False)
    assert proc.returncode == 2
    assert "diagnostics.noise_pieces: the step's single micro-batch of 4 sequences cannot be cut into 3" in proc.stderr
