"""PC layer (models/pc.py, arXiv:2606.06470): the singular-value map against an SVD reference, the power
iteration, level 0 = the plain model bit for bit, the gradient through s, training with AdamW and Muon, the
merge and the Hugging Face export, and CLI runs.

    .venv/bin/python -m pytest tests/test_pc_layer.py -q
"""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import logits_tol, read_jsonl, run_train
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from harness.config.validate import build_optimizer_spec
from models import ROLE_GROUP, ModelConfig, build_model
from models.hf import to_hf
from models.pc import PC_COEFFS, PCLinear, merge_pc, pc_layers, pc_polynomial
from optimizers.groups import split_parameters

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 256, "block_size": 32}  # ms per step


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One intra-op thread here and in train.py subprocesses: these matrices are tiny, and on a shared
    2-core machine a second spinning OpenMP thread multiplied the CPU time several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def f(x: torch.Tensor, level: int) -> torch.Tensor:
    """The scalar map σ -> σ p(σ²) of PC_COEFFS (checked against the design's values below)."""
    return x * sum(c * x ** (2 * k) for k, c in enumerate(PC_COEFFS[level]))


def pc_layer(out_features: int, in_features: int, level: int, blocks: int = 1, seed: int = 0) -> PCLinear:
    """A float64 PC layer with a N(0, 0.02) weight and a converged estimate s."""
    torch.manual_seed(seed)
    layer = PCLinear(in_features, out_features, level=level, power_iters=10, blocks=blocks).double()
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    layer.reset_estimate()
    return layer


def svd_reference(w: torch.Tensor, level: int, s: float, scale: float) -> torch.Tensor:
    """U diag(f(σ_i / s) · scale) Vᵀ: what W_eff must be, computed from W's SVD."""
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ torch.diag(f(sigma / s, level) * scale) @ vh


def test_scalar_map_matches_the_design_values():
    x = torch.linspace(0.0, 1.0, 10001, dtype=torch.float64)
    # pc_polynomial on a batch of 1x1 matrices is f itself: this checks the coded coefficients.
    fx = {level: pc_polynomial(x[:, None, None], level).flatten() for level in PC_COEFFS}
    # fp64, |f| <= 1.1: Horner and the power sum round to ~(degree + 1) sum|c_k| eps <= 5e-14 (level 4; measured
    # <= 3.6e-15); a coefficient off in its third decimal moves f by >= 1e-3
    for level in PC_COEFFS:
        assert abs(fx[level][-1].item() - 1.0) < 1e-12  # f(1) = 1: s maps to s
        assert torch.allclose(fx[level], f(x, level), rtol=0, atol=1e-12)
    at = {0.1: 1000, 0.5: 5000}
    assert [round(fx[4][at[v]].item(), 3) for v in at] == [0.353, 1.020]
    assert [round(fx[2][at[v]].item(), 3) for v in at] == [0.207, 0.854]
    assert abs(fx[4].max().item() - 1.0205) < 1e-4 and abs(x[fx[4].argmax()].item() - 0.51) < 0.01
    assert abs(fx[2].max().item() - 1.010) < 1e-3


@pytest.mark.parametrize("level", sorted(PC_COEFFS))
@pytest.mark.parametrize("shape", [(24, 10), (10, 24)], ids=["tall", "wide"])
def test_effective_weight_maps_singular_values(level, shape):
    layer = pc_layer(*shape, level)
    with torch.no_grad():
        layer.gamma.fill_(1.3)
        s = layer.spectral_estimate().item()
        w_eff = layer.effective_weight()
        sigma = torch.linalg.svdvals(layer.weight)
        assert abs(s - 1e-7 - sigma[0].item()) < 1e-6 * s  # converged: f acts on σ / σ_max <= 1
        # The same singular vectors, singular values f(σ_i / s) · s · γ (sorted: f is not monotonic).
        ref = svd_reference(layer.weight, level, s, s * 1.3)
        # fp64, entries O(0.1): measured <= 2.8e-16 (~10 eps of the scale), 1e-14 ~ 400 eps; a wrong singular
        # vector or value moves entries by O(1e-3) or more
        assert (w_eff - ref).abs().max() < 1e-14
        got, want = torch.linalg.svdvals(w_eff), (f(sigma / s, level) * s * 1.3).sort(descending=True).values
        assert (got - want).abs().max() < 1e-14


def test_fused_blocks_are_preconditioned_separately():
    # GPT-2's fused [q; k; v] with pc_qkv: three matrices with their own s, u, v and γ.
    layer = pc_layer(3 * 8, 20, level=3, blocks=3)
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([0.5, 1.0, 2.0]))
        s = layer.spectral_estimate()
        for b, block in enumerate(layer.weight.split(8)):
            assert abs(s[b] - 1e-7 - torch.linalg.matrix_norm(block, 2)) < 1e-6 * s[b]
            ref = svd_reference(block, 3, s[b].item(), s[b].item() * layer.gamma[b].item())
            assert (layer.effective_weight()[8 * b:8 * (b + 1)] - ref).abs().max() < 1e-14


def test_polynomial_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = PCLinear(64, 256, level=4, power_iters=10)
    x = torch.randn(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w_eff, y = layer.effective_weight(), layer(x)
    assert w_eff.dtype == torch.float32 and torch.equal(w_eff, layer.effective_weight())
    assert y.dtype == torch.bfloat16  # the layer's matmul itself is autocast as usual


def test_power_iteration_converges_and_stays_warm():
    # fp32, as in training; N(0, 0.02) weights have a small spectral gap (slow power iteration).
    torch.manual_seed(0)
    layer = PCLinear(128, 512, level=2, power_iters=10)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
    layer.reset_estimate()

    def rel_error(pc: PCLinear) -> float:
        sigma = torch.linalg.matrix_norm(pc.weight.double(), 2).item()
        return abs(pc.spectral_estimate().item() - 1e-7 - sigma) / sigma

    # The build refreshes until one refresh moves s by <= 1e-6 relative. What is left is convergence, not
    # rounding: N(0, 0.02) 128 x 512 has a small gap, each refresh shrinks the error by q = 0.86 (measured), so
    # when the rule stops the error is <= 1e-6 q / (1 - q) = 6e-6 (measured 4.6e-6 in fp32, 4.7e-6 for the
    # same u, v in fp64: fp32 rounding of s adds only 7.5e-8).
    assert rel_error(layer) < 1e-5
    with torch.no_grad():  # an optimizer-sized step: W changes by 1% (Frobenius)
        step = torch.randn_like(layer.weight)
        layer.weight.add_(step * (0.01 * layer.weight.norm() / step.norm()))
    stale = rel_error(layer)
    layer.refresh()  # one refresh (10 iterations) from the previous u, v
    assert rel_error(layer) < min(1e-5, stale)  # measured 1.5e-6, from 5.1e-5 before the refresh
    torch.manual_seed(1)
    cold = PCLinear(128, 512, level=2, power_iters=10)
    with torch.no_grad():
        cold.weight.copy_(layer.weight)
        cold.u.copy_(F.normalize(torch.randn_like(cold.u), dim=-1))
        cold.v.copy_(F.normalize(torch.randn_like(cold.v), dim=-1))
    cold.refresh()
    assert rel_error(cold) > 1e-3  # measured 1.3e-2: one refresh from random vectors is far from converged


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_level_0_is_the_plain_model_bit_for_bit(family):
    idx = torch.randint(0, 4096, (2, 16))
    torch.manual_seed(0)
    plain = build_model(ModelConfig(family=family))
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    off = build_model(ModelConfig(family=family, pc_level=0, pc_qkv=True, pc_power_iters=3))
    assert torch.equal(torch.get_rng_state(), rng)  # the same initialisation draws
    assert not pc_layers(off) and off.param_roles() == plain.param_roles()
    assert plain.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(t, off.state_dict()[k]) for k, t in plain.state_dict().items())
    with torch.no_grad():
        assert torch.equal(plain(idx)[0], off(idx)[0])
    # With PC on, W keeps the plain initialisation (u, v are drawn after all weights); γ starts at 1.
    torch.manual_seed(0)
    pc = build_model(ModelConfig(family=family, pc_level=4)).state_dict()
    assert all(torch.equal(t, pc[k]) for k, t in plain.state_dict().items())
    assert {k.rsplit(".", 1)[1] for k in set(pc) - set(plain.state_dict())} == {"gamma", "u", "v"}
    assert all(torch.equal(t, torch.ones(1)) for k, t in pc.items() if k.endswith(".gamma"))


@pytest.mark.parametrize("shape", [(12, 7), (7, 12)], ids=["tall", "wide"])
def test_gradient_flows_through_s(shape):
    layer = pc_layer(*shape, level=4)
    x, r = torch.randn(5, shape[1], dtype=torch.float64), torch.randn(5, shape[0], dtype=torch.float64)
    loss = (layer(x) * r).sum()
    loss.backward()
    with torch.no_grad():  # W_eff is linear in γ: dL/dγ = (L - bias term) / γ
        assert torch.allclose(layer.gamma.grad, (loss - (layer.bias * r).sum()) / layer.gamma)
    u, v, s0 = layer.u[0], layer.v[0], layer.spectral_estimate().item()

    def reference_loss(w: torch.Tensor, s_in_f: float | None) -> float:
        """L with W_eff = U f(Σ / s) Vᵀ · s0 (SVD, independent of pc_polynomial); s = uᵀWv + 1e-7 with u, v
        fixed, or s = s_in_f held constant; s0 (the recovered scale) is constant as in s.detach()."""
        s = (u @ w @ v).item() + 1e-7 if s_in_f is None else s_in_f
        return ((x @ svd_reference(w, 4, s, s0).T) * r).sum().item()

    torch.manual_seed(1)
    w, eps = layer.weight.detach(), 1e-6
    for _ in range(3):  # central differences along random directions, float64
        d = torch.randn_like(w)
        fd = (reference_loss(w + eps * d, None) - reference_loss(w - eps * d, None)) / (2 * eps)
        autograd = (layer.weight.grad * d).sum().item()
        # fp64 central difference, h = 1e-6: h^2 truncation + eps64 |L| / h rounding ~ 1e-10 relative
        assert abs(fd - autograd) < 1e-7 * abs(autograd)
        # The path through s matters: holding s fixed gives a different derivative.
        fixed = (reference_loss(w + eps * d, s0) - reference_loss(w - eps * d, s0)) / (2 * eps)
        assert abs(fixed - autograd) > 1e-3 * abs(autograd)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_trains_with_adamw_and_muon(optimizer):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**SMALL, pc_level=2))
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    gains = {id(p) for n, p in model.named_parameters() if n.endswith(".gamma")}
    weights = {id(layer.weight) for layer in pc_layers(model)}
    assert len(gains) == len(weights) == 3 * SMALL["n_layer"]  # attn_out, mlp_up, mlp_down (not QKV)
    assert gains <= {id(p) for p in split.params("gain_bias")}
    assert weights <= {id(p) for p in split.params("hidden")}
    opt = build_optimizer_spec(OmegaConf.load(ROOT / "conf" / "optimizer" / f"{optimizer}.yaml")).build(split)
    if optimizer == "muon":  # the matrix method (not its auxiliary AdamW) updates the PC weights
        hidden = [g for g in opt.param_groups if g.get("group") == "hidden"]
        assert weights <= {id(p) for g in hidden for p in g["params"]}
        assert type(opt.optimizers[0]).__name__ == "Muon" and hidden[0] in opt.optimizers[0].param_groups
    idx = torch.randint(0, SMALL["vocab_size"], (4, SMALL["block_size"] + 1))
    losses = []
    for _ in range(20):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        model.after_optimizer_step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses  # ln(256) = 5.5 at the start
    # The refreshes keep s near σ_max while W moves fast (lr 3e-3 on entries of 0.02). What s must meet: f
    # flat near 1, so σ_max / s within 10% changes the top singular value by < 1% (level 2: f(0.9) = 1.008,
    # f(1.1) = 1.006). Measured relative errors (2-core AMD EPYC, 2026-12-01): 2.5e-2 (AdamW), 3.7e-3 (Muon);
    # without the refreshes 0.30 and 0.35.
    for layer in pc_layers(model):
        sigma = torch.linalg.matrix_norm(layer.weight.detach().double(), 2).item()
        assert abs(layer.spectral_estimate().item() - sigma) < 0.1 * sigma


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_and_hugging_face_models_match_the_pc_model(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(family=family, pc_level=3, pc_qkv=True)).eval()
    with torch.no_grad():  # non-trivial gains and biases, so every folded tensor matters
        for name, p in model.named_parameters():
            if name.endswith((".gamma", ".bias")):
                p.normal_(1.0 if name.endswith(".gamma") else 0.0, 0.2)
    idx = torch.randint(0, 4096, (2, 24))
    merged = merge_pc(model)
    assert merged.cfg.pc_level == 0 and not pc_layers(merged) and pc_layers(model)
    assert merged.num_params() == model.num_params() - sum(layer.blocks for layer in pc_layers(model))
    with torch.no_grad():
        ours = model(idx)[0]
        assert ours.abs().max() > 0.1
        # fp32; measured max |diff|: merged 0 (the same W_eff); HF gpt2 <= 3.6e-7 (Conv1D addmm), llama 0;
        # conftest.logits_tol here ~1e-5 (90 eps of max|logit| ~ 1); a wrongly folded gain or bias is O(0.1)
        tol = logits_tol(model, idx.shape[1], ours)
        assert (merged(idx)[0] - ours).abs().max() < tol
        assert (to_hf(model)(idx).logits - ours).abs().max() < tol


@pytest.mark.parametrize("changes, message", [
    ({"pc_level": 5}, r"^model\.pc_level: must be 0 \(off\) or a degree 1-4 \(got 5\)"),
    ({"pc_power_iters": 0}, r"^model\.pc_power_iters: must be > 0 \(got 0\)"),
])
def test_validate_names_the_pc_key(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(**changes))


def load_script(name: str):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


@pytest.mark.parametrize("model", ["gpt2_tiny", pytest.param("llama_tiny", marks=pytest.mark.slow)])
def test_cli_run_merge_and_export(kjv_dir, tmp_path, model):
    run = tmp_path / "run"
    run_train(run, f"model={model}", "model.pc_level=4", "data.val_tokens=1024")
    vals = [r["val_loss"] for r in read_jsonl(run / "metrics.jsonl") if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.5, vals
    assert OmegaConf.load(run / "config.yaml").model.pc_level == 4
    # scripts/merge_pc.py writes a plain model_final.pt with the same outputs; export_hf.py merges too.
    assert load_script("merge_pc").main([str(run), str(tmp_path / "merged")]) == 0
    assert load_script("export_hf").main([str(run), str(tmp_path / "hf")]) == 0
    load_model = load_script("export_hf").load_model
    pc, merged = load_model(run / "model_final.pt"), load_model(tmp_path / "merged" / "model_final.pt")
    assert pc.cfg.pc_level == 4 and merged.cfg == dataclasses.replace(pc.cfg, pc_level=0)
    data_dir = OmegaConf.load(run / "config.yaml").data.dir  # kept, so export_hf finds the tokenizer
    assert OmegaConf.load(tmp_path / "merged" / "config.yaml").data.dir == data_dir
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        ours = pc.eval()(idx)[0]
        tol = logits_tol(pc, idx.shape[1], ours)
        assert (merged(idx)[0] - ours).abs().max() < tol
        assert (hf(idx).logits - ours).abs().max() < tol
