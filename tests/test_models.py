"""Models: Hugging Face logit parity, parameter roles, preset parameter counts, config errors, HF export.

    .venv/bin/python -m pytest tests/test_models.py -q
"""

import dataclasses
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import logits_tol, model_path_terms, rounding_tol
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import ROLE_GROUP, ROLES, ModelConfig, build_model
from models.base import differentiable_loss
from models.hf import from_hf, to_hf

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "conf" / "model").glob("*.yaml"))
TINY = {
    "gpt2": ModelConfig(),
    "llama": ModelConfig(family="llama"),
    "llama_gqa": ModelConfig(family="llama", n_kv_head=2),
}


def random_model(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Built and then given O(1) logits and non-trivial gains and biases, so every tensor's mapping matters."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, role in model.param_roles().items():
            model.get_parameter(name).normal_(1.0 if role == "norm" else 0.0, 0.1)
    return model


def load_export_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_hf
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return export_hf


@pytest.mark.parametrize("name", TINY)
def test_logits_match_hugging_face(name):
    model = random_model(TINY[name])
    hf = to_hf(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, loss = model(idx[:, :-1], idx[:, 1:])
        out = hf(idx, labels=idx)  # HF shifts the labels itself
        assert ours.abs().max() > 1.0  # the comparison is not between near-zero logits
        # fp32: T-1 vs T tokens run through different kernel blockings (at equal T Llama agrees bit for bit,
        # GPT-2 to 3.3e-6 from Conv1D's addmm vs nn.Linear). T = 48: 91 eps x max|logit| = 5.5e-5 at logits O(5);
        # measured 3.8e-6 (GPT-2) to 6.7e-6 (Llama), 2-core AMD EPYC. A mapping bug (a tensor transposed, a gain or
        # bias dropped, another RoPE) moves O(5) logits by O(0.1) and more.
        tol = logits_tol(model, idx.shape[1], ours)
        assert (ours - out.logits[:, :-1]).abs().max() < tol
        # the mean of logsumexp(z) - z_y moves by <= 2 max|dz|, plus each side's rounding of its V-term sum
        lse_tol = rounding_tol(model.cfg.vocab_size, torch.float32) * loss.item()
        assert abs(loss.item() - out.loss.item()) < 2 * tol + 2 * lse_tol
        # fp64 (eps 2.2e-16): the same estimate is ~1e-13, so a difference in the maths cannot hide in it
        ours64, _ = model.double()(idx)
        assert (ours64 - hf.double()(idx).logits).abs().max() < logits_tol(model, idx.shape[1], ours64)
        back, _ = from_hf(hf.float())(idx)
        assert torch.equal(back, model.float()(idx)[0])


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_has_one_role(name):
    model = build_model(TINY[name])
    roles = model.param_roles()
    assert list(roles) == [n for n, _ in model.named_parameters()]
    assert set(roles.values()) <= set(ROLES)
    assert set(ROLE_GROUP) == set(ROLES)


def test_an_undeclared_parameter_is_an_error():
    model = build_model(TINY["llama"])
    model.model.layers[1].scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(RuntimeError, match=r"without a declared role: \['model.layers.1.scale'\]"):
        model.param_roles()


def test_role_groups_of_tiny_models():
    counts = {name: Counter(ROLE_GROUP[r] for r in build_model(cfg).param_roles().values())
              for name, cfg in TINY.items()}
    # GPT-2, 4 layers: wte (tied head) + wpe; 4 matrices per block; 8 gains/biases per block + ln_f's 2.
    assert counts["gpt2"] == {"embedding": 2, "hidden": 16, "gain_bias": 34}
    # Llama, 4 layers: q, k, v, o, gate, up, down per block; 2 RMSNorm gains per block + the final one.
    assert counts["llama"] == counts["llama_gqa"] == {"embedding": 1, "head": 1, "hidden": 28, "gain_bias": 9}
    roles = build_model(TINY["gpt2"]).param_roles()
    assert roles["transformer.wte.weight"] == "embed" and roles["transformer.h.0.attn.c_attn.bias"] == "bias"


def load_preset(path: Path) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def test_presets_build_and_match_their_stated_counts():
    names = [p.stem for p in PRESETS]
    assert names == ["gpt2_124m", "gpt2_350m", "gpt2_micro", "gpt2_tiny", "llama_150m", "llama_1b", "llama_tiny"]
    for path in PRESETS:
        cfg = load_preset(path)
        # every field stated, but a user's model's class and options (_target_, options), which no preset has
        assert set(OmegaConf.load(path)) == set(ModelConfig.__dataclass_fields__) - {"_target_", "options"}
        with torch.device("meta"):
            model = build_model(cfg)
        stated = re.search(r"([\d,]+) parameters", path.read_text().splitlines()[0]).group(1)
        assert model.num_params() == int(stated.replace(",", "")), path.name


def test_gpt2_124m_counts_and_flops():
    with torch.device("meta"):
        model = build_model(load_preset(ROOT / "conf/model/gpt2_124m.yaml"))
    assert model.num_params() == 124_475_904  # nanoGPT, vocab 50304, wpe included
    assert model.num_params(non_embedding=True) == 123_689_472  # nanoGPT's printed "123.69M"
    # 6 * (84,934,656 block matrices + 38,633,472 tied head) + 6 * 12 layers * 768 * 1024 (causal attention)
    assert model.flops_per_token(1024) == 6 * 123_568_128 + 6 * 12 * 768 * 1024 == 798_031_872
    assert model.attn_layout() == {"n_head": 12, "n_kv_head": 12, "head_dim": 64}


def test_init_statistics():
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=8, d_model=256))
    blk = model.transformer.h[0]

    def close_to(w: torch.Tensor, std: float) -> bool:  # the sample std of n normals has SE std / sqrt(2 n)
        return abs(w.std().item() - std) < 6 * std / math.sqrt(2 * w.numel())  # 6 SE, 262,144 draws: 0.8%

    assert close_to(blk.mlp.c_fc.weight, 0.02)
    assert close_to(blk.mlp.c_proj.weight, 0.02 / 4)  # 1 / sqrt(2 * 8 layers); 1 / sqrt(8) would be 41% off
    assert blk.attn.c_attn.bias.abs().sum() == 0 and torch.all(blk.ln_1.weight == 1)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_forward_rejects_sequences_longer_than_block_size(name):
    model = build_model(TINY[name])
    with pytest.raises(ValueError, match="257 exceeds model.block_size=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.parametrize("changes, message", [
    ({"family": "mamba"}, r"^model\.family: 'mamba' is not one of gpt2, llama"),
    ({"d_model": 100, "n_head": 3}, r"^model\.n_head: d_model=100 is not divisible by n_head=3"),
    ({"family": "llama", "n_kv_head": 3}, r"^model\.n_kv_head: n_head=4 is not divisible by n_kv_head=3"),
    ({"n_kv_head": 2}, r"^model\.n_kv_head: gpt2 has no grouped-query attention"),
    ({"family": "llama", "d_model": 12, "n_head": 4}, r"^model\.n_head: RoPE needs an even head_dim"),
    ({"n_layer": 0}, r"^model\.n_layer: must be > 0 \(got 0\)"),
    ({"norm_eps": 0.0}, r"^model\.norm_eps: must be > 0"),
])
def test_validate_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelConfig(**changes))


def test_llama_ffn_rule():
    assert [ModelConfig(family="llama", d_model=d).ffn_dim for d in (128, 768, 2048, 4096)] == [512, 2048, 5632, 11008]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_export_round_trip(tmp_path, name):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = random_model(TINY[name])
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "in": 1, "the": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(run / "data" / "tokenizer.json"))
    (run / "config.yaml").write_text(f"data:\n  dir: {run / 'data'}\n")
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a compiled model
    torch.save({"model_config": dataclasses.asdict(model.cfg), "state_dict": state}, run / "model_final.pt")

    assert load_export_script().main([str(run), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        reloaded = hf(idx).logits
        assert torch.equal(reloaded, to_hf(model)(idx).logits)  # saving and loading change nothing
        ours = model(idx)[0]
        assert (reloaded - ours).abs().max() < logits_tol(model, idx.shape[1], ours)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("in the")["input_ids"] == [1, 2]


def test_export_names_the_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/export_hf.py", str(tmp_path), str(tmp_path / "out")],
                          check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{tmp_path / 'model_final.pt'} not found" in proc.stderr


def test_fused_cross_entropy_equals_torch():
    """models.base.CrossEntropy (the CPU training loss): the loss, the gradient, gradcheck and gradgradcheck
    in float64, and Hessian-vector products (double backward, as the diagnostics take them) equal
    F.cross_entropy's."""
    import torch.nn.functional as F

    from models.base import CrossEntropy

    g = torch.Generator().manual_seed(0)
    n, c = 64, 50
    z = (3 * torch.randn(n, c, generator=g)).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    ours, ref = CrossEntropy.apply(z, y), F.cross_entropy(z, y)
    # each row's C-term log-sum-exp and the mean over N rows round differently (measured: 1 eps)
    assert ours.item() == pytest.approx(ref.item(), rel=rounding_tol(c + n, torch.float32))
    (g1,), (g2,) = torch.autograd.grad(ours, z), torch.autograd.grad(ref, z)
    # Entry by entry: exp(z - lse) / N turns the absolute rounding of z - lse (|z - lse| eps, plus the
    # log-sum-exp's sqrt(C) eps) into a relative one, on either side: 2 (20 + 7) eps = 6.4e-6 here (measured
    # 17 eps = 2e-6); the target entries (p - 1) / N keep p's absolute error, rtol x 1 / N.
    with torch.no_grad():
        spread = (z - torch.logsumexp(z, 1, keepdim=True)).abs().max().item()
    rtol = 2 * (spread + math.sqrt(c)) * torch.finfo(torch.float32).eps
    assert torch.allclose(g1, g2, rtol=rtol, atol=rtol / n)
    z64 = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y64 = torch.randint(0, 5, (6,), generator=g)
    assert torch.autograd.gradcheck(lambda t: CrossEntropy.apply(t, y64), (z64,))
    assert torch.autograd.gradgradcheck(lambda t: CrossEntropy.apply(t, y64), (z64,))
    v = torch.randn(6, 5, dtype=torch.float64, generator=g)
    hv = []
    for f in (CrossEntropy.apply, F.cross_entropy):
        (grad,) = torch.autograd.grad(f(z64, y64), z64, create_graph=True)
        hv.append(torch.autograd.grad(grad, z64, grad_outputs=v)[0])
    assert torch.allclose(hv[0], hv[1], rtol=1e-10, atol=1e-12)  # fp64: rounding ~1e-15, a wrong Hessian O(1)
    model = build_model(ModelConfig(family="gpt2", n_layer=1, n_head=2, d_model=8, vocab_size=16, block_size=8))
    idx = torch.randint(0, 16, (2, 8), generator=g)
    with differentiable_loss():  # the loss the diagnostics' Hessian-vector products take
        _, loss = model(idx, idx)
    assert type(loss.grad_fn).__name__ == "CrossEntropyBackward"
    with torch.no_grad():  # F.cross_entropy, and possibly other kernels without autograd: their rounding
        _, plain = model(idx, idx)
    terms = model_path_terms(model.cfg, 8) + model.cfg.d_model + model.cfg.vocab_size + idx.numel()
    assert plain.item() == pytest.approx(loss.item(), rel=rounding_tol(terms, torch.float32))


def test_fused_head_and_loss_equal_the_plain_ones():
    """models.base.LinearCrossEntropy (the CPU training head + loss, chunked over tokens, gradients computed
    in the forward): loss and gradients of x and W equal F.linear + F.cross_entropy's over several chunks
    (1,300 tokens x 4,096 words: chunks of 512, 512 and 276), a frozen W gets none, double backward refuses loudly."""
    import torch.nn.functional as F

    from models.base import LinearCrossEntropy

    g = torch.Generator().manual_seed(0)
    n, c, v = 1300, 32, 4096
    x = torch.randn(n, c, generator=g, requires_grad=True)
    W = (0.3 * torch.randn(v, c, generator=g)).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    ours, ref = LinearCrossEntropy.apply(x, W, y), F.cross_entropy(F.linear(x, W), y)
    # the logits (C-term dot products), each row's V-term log-sum-exp and the mean over N, in other orders
    assert ours.item() == pytest.approx(ref.item(), rel=rounding_tol(c + v + n, torch.float32))
    assert ref.item() > 5  # not a degenerate comparison (log 4096 = 8.3)
    # dx = e W sums over V words, dW = e^T x over N tokens; e carries the logits' and the softmax's rounding
    # (C + V). Against each tensor's scale, as entries that cancel to ~0 keep their terms' absolute error:
    # 90 and 74 eps (measured 1.2 and 3.7 eps). A chunk-boundary bug (a row lost or counted twice, a chunk's
    # dW not accumulated, another N) moves entries by ~1/N = 8e-4 of the scale or more.
    terms = {"x": c + 2 * v, "W": c + v + n}
    for name, a, b in zip("xW", torch.autograd.grad(ours, (x, W)), torch.autograd.grad(ref, (x, W))):
        assert b.abs().max() > 1e-4
        tol = rounding_tol(terms[name], torch.float32)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)
    frozen = W.detach()
    (gx,) = torch.autograd.grad(LinearCrossEntropy.apply(x, frozen, y), (x,))
    gx_ref = torch.autograd.grad(F.cross_entropy(F.linear(x, frozen), y), x)[0]
    tol = rounding_tol(terms["x"], torch.float32)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol * gx_ref.abs().max().item())
    with pytest.raises(RuntimeError, match="differentiable_loss"):
        torch.autograd.grad(LinearCrossEntropy.apply(x, W, y), x, create_graph=True)


@pytest.mark.parametrize("name", TINY)
def test_training_loss_takes_the_fused_head(name):
    # CPU training (fp32, gradients on) runs the fused head; its parameter gradients (GPT-2: the tied
    # embedding gets the head's and the lookup's) equal those of the plain head under differentiable_loss()
    model = random_model(TINY[name])
    cfg, (b, t) = model.cfg, (2, 32)
    idx = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=torch.Generator().manual_seed(4))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits is None and type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward"
    fused = torch.autograd.grad(loss, list(model.parameters()))
    with differentiable_loss():
        logits, plain = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (b, t, cfg.vocab_size)
    # the same forward up to the head; then each row's V-term log-sum-exp and the mean over B*T tokens
    assert loss.item() == pytest.approx(plain.item(), rel=rounding_tol(cfg.vocab_size + b * t, torch.float32))
    # The two heads round dx = e W (V terms) differently, and from there every op of the backward rounds
    # differently: the rounding of the whole backward path (conftest.model_path_terms) and of the weight
    # gradients' sums over B*T tokens, 111 eps = 1.3e-5 of each tensor's largest entry (measured <= 10 eps,
    # 2-core AMD EPYC; an elementwise rtol fails where an entry's terms cancel, as 1e-4 / 1e-7 did for
    # embed_tokens on a Xeon). A real difference (a token's gradient lost, the tied embedding missing the
    # head's part, another normalisation) moves gradients by ~1/(B*T) = 1.6e-2 of their scale or more.
    tol = rounding_tol(cfg.vocab_size + model_path_terms(cfg, t) + b * t, torch.float32)
    for (n, _), a, g in zip(model.named_parameters(), fused, torch.autograd.grad(plain, list(model.parameters()))):
        torch.testing.assert_close(a, g, rtol=tol, atol=tol * g.abs().max().item(), msg=n)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fused_head_under_bf16_autocast_equals_the_plain_one(x_dtype):
    """Under CPU bf16 autocast head_and_loss takes LinearCrossEntropy with bf16 matmuls (logits None): loss and
    the gradients of x (in x's dtype; GPT-2's LayerNorm and Llama's RMSNorm hand it fp32) and W (fp32) equal
    autocast's F.linear + fp32 CrossEntropy (the plain head, under differentiable_loss()) over several chunks
    (1,300 tokens x 4,096 words: 512, 512, 276); a frozen W gets none."""
    model = build_model(TINY["gpt2"])  # head_and_loss only: x and W below are not the model's
    g = torch.Generator().manual_seed(0)
    b, t, c, v = 2, 650, 32, 4096
    x = torch.randn(b, t, c, generator=g).to(x_dtype).requires_grad_(True)
    W = (0.3 * torch.randn(v, c, generator=g)).requires_grad_(True)
    y = torch.randint(0, v, (b, t), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, ours = model.head_and_loss(x, W, y)
        with differentiable_loss():
            z, ref = model.head_and_loss(x, W, y)
    assert logits is None and type(ours.grad_fn).__name__ == "LinearCrossEntropyBackward"
    assert z.dtype == torch.bfloat16 and ours.dtype == ref.dtype == torch.float32
    assert ref.item() > 5  # not a degenerate comparison (log 4096 = 8.3)
    # Both take the same bf16 logits (measured: the same bits) into fp32 arithmetic. Were a logit rounded to a
    # neighbouring bf16 value by another kernel blocking (1 ulp <= eps_bf16 |z|), the mean over N rows of such
    # random-signed moves stays below eps_bf16 max|z| / sqrt(N) = 1.5e-3; a row lost or counted twice moves the
    # loss by ~loss / N = 7.5e-3.
    eps = torch.finfo(torch.bfloat16).eps
    n = b * t
    assert ours.item() == pytest.approx(ref.item(), abs=eps * z.abs().max().item() / math.sqrt(n))
    # dx = e W and dW = e^T x: bf16 operands, bf16 results. Each side rounds each entry to bf16 (<= eps_bf16 / 2
    # of it; ours rounds dW per chunk and sums in fp32), and an entry of e, whose fp32 value differs in its last
    # bits between the two softmaxes, may round to the neighbouring bf16 value on one side (eps_bf16 of that
    # product): 2 eps_bf16 = 1.6% of each tensor's largest entry (measured 0.25 and 0.5 eps_bf16, 2-core AMD
    # EPYC). A chunk-boundary bug moves a row of dx by its whole size, dW by >= 21% (a chunk of 276 dropped).
    grads = zip("xW", torch.autograd.grad(ours, (x, W)), torch.autograd.grad(ref, (x, W)), (x_dtype, torch.float32))
    for name, a, r, dtype in grads:
        assert a.dtype == r.dtype == dtype, name
        torch.testing.assert_close(a, r, rtol=2 * eps, atol=2 * eps * r.abs().max().item(), msg=name)
    frozen = W.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ours = model.head_and_loss(x, frozen, y)
        with differentiable_loss():
            _, ref = model.head_and_loss(x, frozen, y)
    assert type(ours.grad_fn).__name__ == "LinearCrossEntropyBackward"
    (gx,), (gx_ref,) = torch.autograd.grad(ours, (x,)), torch.autograd.grad(ref, (x,))
    torch.testing.assert_close(gx, gx_ref, rtol=2 * eps, atol=2 * eps * gx_ref.abs().max().item())


def test_bf16_training_with_the_fused_head_follows_the_plain_one(monkeypatch):
    """GPT-2 (2 layers) trained 4 SGD steps under CPU bf16 autocast: the fused bf16 head (LinearCrossEntropy)
    gives the losses of the plain head (fused_head_applies patched to False: F.linear + fp32 CrossEntropy)."""
    import models.base

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 4096, (5, 129), generator=g)  # 640 tokens: chunks of 512 and 128

    def train() -> list[float]:
        torch.manual_seed(0)
        model = build_model(ModelConfig(n_layer=2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, loss = model(idx[:, :-1], idx[:, 1:])
            assert (logits is None) == (type(loss.grad_fn).__name__ == "LinearCrossEntropyBackward")
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append((logits is None, loss.item()))
        return losses

    fused = train()
    monkeypatch.setattr(models.base, "fused_head_applies", lambda x, weight: False)
    plain = train()
    assert all(f for f, _ in fused) and not any(f for f, _ in plain)
    fused, plain = [loss for _, loss in fused], [loss for _, loss in plain]
    assert fused[0] - fused[-1] > 0.2  # it trains: 8.34 -> 8.01
    # The heads round the gradient in bf16 differently (test above), and every later step then rounds
    # differently too: bf16 autocast's own noise, which moves these losses from fp32 training's by up to
    # 2.9e-4 (measured; fused vs plain: 1.3e-4, 2-core AMD EPYC). 1e-3 is 3x that; a head gradient 10% off
    # (dx) or 20% off (dW) moves them by >= 3.6e-3.
    assert fused == pytest.approx(plain, abs=1e-3)
