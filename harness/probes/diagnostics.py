"""Training diagnostics that explain why an optimizer wins: per-layer update geometry, gradient noise and
curvature on a fixed probe batch, written to RUN_DIR/diagnostics.jsonl (and W&B) every `diagnostics.every`
steps. Off by default; when on, nothing here changes training (no global RNG draw, no write to a parameter,
gradient, buffer or optimizer state), the time spent is taken out of the training clock, and the losses stay
bit-identical (tests/test_diagnostics.py).

    python train.py experiment=bench_micro optimizer=muon diagnostics.every=20

Per hidden matrix (GPT-2's fused QKV split into its Q, K, V rows), keyed "L<layer>.<role>":
  update geometry   the applied update U = W_after - W_before: RMS, RMS / lr (Moonlight's AdamW match is 0.2),
                    |U| / |W|, cos(-U, gradient), and U's singular values: top, stable rank |U|_F^2 / s_1^2,
                    entropy effective rank exp(H(s / sum s)) (Roy & Vetterli 2007), nuclear / Frobenius
  weight spectrum   spectral norm and stable rank of W after the step; PC layers: the same for W_eff ("eff_")
  gradient noise    the step's data re-split into K pieces (the micro-batches, or the micro-batch cut in
                    `noise_pieces`), gradients at the pre-update weights: tr Cov / |mean|^2 across pieces
Curvature on the first `probe_batch_size` validation sequences, by Hessian-vector products (double backward):
  lambda_max        power iteration (shifted when the largest |eigenvalue| is negative), lr * lambda_max / 2
                    against GD's limit 1 (lr: the first parameter group's)
  step curvature    along the step u itself: uᵀHu / |u|^2 and the overshoot ratio (uᵀHu / 2) / -g_beforeᵀu,
                    GD's lr * lambda / 2 for any optimizer (> 1: the step passed the line minimum)
  trace             Hutchinson, Rademacher probes, with its standard error
  off-block share   1 - sum_b |H_bb|_F^2 / |H|_F^2, blocks = parameter groups (or tensors); per block b,
                    E|H z_b|^2 = |H[:, b]|_F^2 and E|(H z_b)_b|^2 = |H_bb|_F^2 for Rademacher z_b on b
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.base import differentiable_loss
from optimizers.groups import row_blocks, row_slices
from runtime.files import atomic_write_text, finite_or_none

UPDATE_KEYS = ("update_rms", "update_rms_per_lr", "update_to_weight", "cos_update_grad", "update_top_sv",
               "update_stable_rank", "update_eff_rank", "update_nuc_over_fro", "weight_spectral_norm",
               "weight_stable_rank")
QKV = ("attn_q", "attn_k", "attn_v")


@dataclass
class DiagnosticsConfig:
    every: int = 0  # steps between diagnostics (and the last step); 0 = off, the default (timed runs pay nothing)
    geometry: bool = True  # per-matrix update geometry and weight spectra
    noise: bool = True  # per-matrix gradient noise across the step's pieces (one extra forward + backward)
    noise_pieces: int = 4  # pieces when the step has a single micro-batch (it is cut into this many)
    hessian: bool = True  # curvature on the fixed probe batch
    probe_batch_size: int = 4  # the first sequences of the validation split
    power_iters: int = 20  # most power-iteration steps for lambda_max ...
    power_tol: float = 1e-3  # ... stopping when it changes by less than this, relatively
    trace_samples: int = 8  # Hutchinson probes; 0 = no trace
    block_samples: int = 2  # Rademacher probes per block for the off-block-diagonal share; 0 = skip it
    blocks: str = "group"  # group (the parameter groups: hidden, embedding, head, gain_bias) | tensor
    seed: int = 0  # seed of the probes' own generator (the training RNG is never drawn from)

    def validate(self) -> None:
        for key in ("every", "trace_samples", "block_samples"):
            if getattr(self, key) < 0:
                raise ValueError(f"diagnostics.{key}: must be >= 0 (got {getattr(self, key)})")
        for key in ("probe_batch_size", "power_iters"):
            if getattr(self, key) < 1:
                raise ValueError(f"diagnostics.{key}: must be >= 1 (got {getattr(self, key)})")
        if self.noise_pieces < 2:
            raise ValueError(f"diagnostics.noise_pieces: must be >= 2 (got {self.noise_pieces})")
        if not self.power_tol > 0:
            raise ValueError(f"diagnostics.power_tol: must be > 0 (got {self.power_tol})")
        if self.blocks not in ("group", "tensor"):
            raise ValueError(f"diagnostics.blocks: {self.blocks!r} is not group or tensor")


# ---- spectral statistics ---------------------------------------------------------------------------------

def spectral_stats(s: torch.Tensor) -> dict[str, float | None]:
    """From singular values s: top, stable rank sum s^2 / s_1^2, entropy effective rank exp(-sum p log p) with
    p = s / sum s, nuclear / Frobenius sum s / sqrt(sum s^2). A zero matrix has none of them."""
    s = s.double()
    top, fro2, nuc = s.max(), (s * s).sum(), s.sum()
    if not top > 0 or not math.isfinite(float(fro2)):
        return {"top_sv": 0.0 if top == 0 else None, "stable_rank": None, "eff_rank": None, "nuc_over_fro": None}
    p = s[s > 0] / nuc
    return {"top_sv": float(top), "stable_rank": float(fro2 / top**2), "eff_rank": float(torch.exp(-(p * p.log()).sum())),
            "nuc_over_fro": float(nuc / fro2.sqrt())}


def singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.detach().to(torch.promote_types(m.dtype, torch.float32)))


def update_stats(before: torch.Tensor, after: torch.Tensor, grad: torch.Tensor | None, lr: float | None,
                 prefix: str = "") -> dict[str, float | None]:
    """The geometry of one applied update U = after - before, against the gradient and the weight."""
    before, after = before.double(), after.double()
    u = after - before
    u_norm, w_norm = float(u.norm()), float(before.norm())
    rms = u_norm / math.sqrt(u.numel())
    out = {"update_rms": rms, "update_rms_per_lr": rms / lr if lr else None,
           "update_to_weight": u_norm / w_norm if w_norm > 0 else None, "cos_update_grad": None}
    if grad is not None:
        g_norm = float(grad.double().norm())
        if u_norm > 0 and g_norm > 0:
            out["cos_update_grad"] = float(-(u * grad.double()).sum()) / (u_norm * g_norm)
    out.update({f"update_{k}": v for k, v in spectral_stats(singular_values(u)).items()})
    w = spectral_stats(singular_values(after))
    out.update({"weight_spectral_norm": w["top_sv"], "weight_stable_rank": w["stable_rank"]})
    return {prefix + k: v for k, v in out.items()}


def noise_stats(pieces_sum: torch.Tensor, pieces_sq: float, k: int, piece_tokens: int) -> dict[str, float | None]:
    """From sum_i g_i and sum_i |g_i|^2 over k pieces: the trace of the covariance across pieces
    s^2 = (sum |g_i|^2 - k |mean|^2) / (k - 1), noise/signal s^2 / |mean|^2, and the simple noise scale
    B = piece_tokens * s^2 / (|mean|^2 - s^2 / k) in tokens (McCandlish et al. 2018; None when the
    denominator, an unbiased |G|^2, is not positive)."""
    mean_sq = float((pieces_sum.double() / k).square().sum())
    var = max((pieces_sq - k * mean_sq) / (k - 1), 0.0)
    signal = mean_sq - var / k
    return {"grad_var": var, "grad_mean_sq": mean_sq,
            "noise_to_signal": var / mean_sq if mean_sq > 0 else None,
            "noise_scale_tokens": piece_tokens * var / signal if signal > 0 else None}


# ---- Hessian-vector products ---------------------------------------------------------------------------

class HVP:
    """v -> H v for the loss at fixed parameters (one double backward through the kept gradient graph)."""

    def __init__(self, loss: torch.Tensor, params: list[torch.Tensor]):
        self.params = params
        self.grads = torch.autograd.grad(loss, params, create_graph=True)
        self.calls = 0

    def __call__(self, v: list[torch.Tensor]) -> list[torch.Tensor]:
        self.calls += 1
        hv = torch.autograd.grad(self.grads, self.params, grad_outputs=v, retain_graph=True, allow_unused=True)
        return [h.detach() if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)]


def _dot(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def rademacher(like: list[torch.Tensor], gen: torch.Generator, mask: list[bool] | None = None) -> list[torch.Tensor]:
    """±1 entries (drawn on the CPU from `gen`, so the values do not depend on the device); zeros where
    mask is False."""
    out = []
    for i, p in enumerate(like):
        if mask is not None and not mask[i]:
            out.append(torch.zeros_like(p))
            continue
        z = torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(p.dtype).mul_(2).sub_(1)
        out.append(z.to(p.device))
    return out


def top_eigenvalue(hvp: Callable, like: list[torch.Tensor], gen: torch.Generator, iters: int,
                   tol: float) -> tuple[float, int, bool]:
    """Power iteration: the eigenvalue of largest magnitude (signed, as the Rayleigh quotient), the number of
    Hessian-vector products used, and whether successive estimates agreed to `tol` before `iters` ran out."""
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in like]
    norm = math.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    lam = math.nan
    for i in range(1, iters + 1):
        hv = hvp(v)
        new = _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0:
            return 0.0, i, True
        v = [x / norm for x in hv]
        if math.isfinite(lam) and abs(new - lam) <= tol * abs(new):
            return new, i, True
        lam = new
    return lam, iters, False


def top_algebraic_eigenvalue(hvp: Callable, like: list[torch.Tensor], gen: torch.Generator, iters: int,
                             tol: float) -> dict[str, Any]:
    """The largest eigenvalue (the sharpness), not the largest in magnitude: power iteration finds lambda_1 of
    largest |.|; when that one is negative, a second run on H - lambda_1 I (whose spectrum is >= 0) finds
    lambda_max - lambda_1."""
    lam, iters_used, converged = top_eigenvalue(hvp, like, gen, iters, tol)
    out = {"lambda_abs_max": lam, "lambda_max": lam, "power_iters": iters_used, "power_converged": converged}
    if lam < 0:
        def shifted(v):
            return [h - lam * x for h, x in zip(hvp(v), v)]

        mu, more, conv2 = top_eigenvalue(shifted, like, gen, iters, tol)
        out.update(lambda_max=mu + lam, power_iters=iters_used + more, power_converged=converged and conv2)
    return out


def hutchinson_trace(hvp: Callable, like: list[torch.Tensor], gen: torch.Generator, samples: int) -> tuple[float, float]:
    """tr H = E[zᵀ H z] for Rademacher z: the mean over samples and its standard error."""
    vals = []
    for _ in range(samples):
        z = rademacher(like, gen)
        vals.append(_dot(z, hvp(z)))
    mean = sum(vals) / len(vals)
    se = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) / len(vals)) if len(vals) > 1 else None
    return mean, se


def step_curvature(hvp: HVP, u: list[torch.Tensor], g_before: list[torch.Tensor]) -> dict[str, float | None]:
    """The step u = w_after - w_before against the probe batch's gradient g_before (at w_before) and Hessian H
    (at w_after): the curvature along the step uᵀHu / |u|^2, and the overshoot ratio (uᵀHu / 2) / -g_beforeᵀu,
    which is > 1 when the step went past the minimum of the loss's quadratic model along its own line. For
    gradient descent it is lr gᵀHg / 2|g|^2 (lr * lambda / 2 along an eigenvector), so it carries GD's
    stability limit to any optimizer, whatever its lr means. None when the step does not descend the probe
    loss to first order."""
    uhu, uu, gu = _dot(u, hvp(u)), _dot(u, u), _dot(g_before, u)
    return {"step_sharpness": uhu / uu if uu > 0 else None, "step_descent": -gu,
            "step_curvature_ratio": uhu / 2 / -gu if gu < 0 else None}


def block_offdiag_share(hvp: Callable, like: list[torch.Tensor], block_of: list[int], gen: torch.Generator,
                        samples: int) -> float | None:
    """1 - sum_b |H_bb|_F^2 / |H|_F^2 (blocks: block_of[i] is the block of tensor i), estimated with
    `samples` Rademacher probes supported on each block (see the module docstring)."""
    col, diag = 0.0, 0.0
    for b in sorted(set(block_of)):
        mask = [blk == b for blk in block_of]
        for _ in range(samples):
            hz = hvp(rademacher(like, gen, mask))
            col += _dot(hz, hz)
            diag += sum(float(h.double().square().sum()) for h, m in zip(hz, mask) if m)
    return 1.0 - diag / col if col > 0 else None


# ---- the recorder ----------------------------------------------------------------------------------------

@dataclass
class Matrix:
    key: str  # "L<layer>.<role>"
    role: str
    layer: int | None
    param: torch.nn.Parameter
    rows: slice  # the rows of `param` this entry covers (a fused QKV weight gives three entries)
    pc: Any = None  # the PC layer owning the parameter (its effective weight), or None


def _layer(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def hidden_matrices(model: torch.nn.Module, split, layout: dict[str, int]) -> list[Matrix]:
    """One entry per hidden matrix and role; GPT-2's fused [q; k; v] weight split by rows."""
    pcs = {}
    for module in model.modules():
        if hasattr(module, "effective_weight") and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            pcs[id(module.weight)] = module
    out = []
    for info in split.infos("hidden"):
        layer, pc = _layer(info.name), pcs.get(id(info.param))
        prefix = f"L{layer}." if layer is not None else f"{info.name}."
        if info.role == "attn_qkv":  # the matrices the optimizers see with qkv=split (optimizers/groups.py)
            slices = row_slices(row_blocks(info.role, tuple(info.param.shape), layout), info.param.shape[0])
            for role, rows in zip(QKV, slices):
                out.append(Matrix(prefix + role, role, layer, info.param, rows, pc))
        else:
            out.append(Matrix(prefix + info.role, info.role, layer, info.param, slice(None), pc))
    return out


class Diagnostics:
    """The diagnostics of one run. The training loop calls, on a due step (`due(step)`):
    before_step() after backward and clipping, before optimizer.step(), then after_step() once the step and
    its after-step hooks are done; after_step returns the record written to diagnostics.jsonl."""

    def __init__(self, cfg: DiagnosticsConfig, model: torch.nn.Module, split, optimizer, data, train_cfg,
                 grad_accum: int, device: torch.device, precision: str, path: Path, write: bool = True,
                 rank: int = 0, world: int = 1):
        self.cfg, self.model, self.optimizer, self.data, self.t = cfg, model, optimizer, data, train_cfg
        self.rank, self.world = rank, world
        self.grad_accum, self.device, self.precision, self.path, self.write = grad_accum, device, precision, path, write
        self.matrices = hidden_matrices(model, split, split.layout)
        self.params = [p for p in model.parameters() if p.requires_grad]
        group_of = {id(i.param): g for g in ("hidden", "embedding", "head", "gain_bias") for i in split.infos(g)}
        names = list(dict.fromkeys(group_of.values()))
        self.block_of = ([names.index(group_of[id(p)]) for p in self.params] if cfg.blocks == "group"
                         else list(range(len(self.params))))
        self._snap: dict[str, Any] = {}
        self.total_s = 0.0

    def due(self, step: int) -> bool:
        return self.cfg.every > 0 and (step % self.cfg.every == 0 or step == self.t.max_steps)

    def lr_of(self, param: torch.Tensor) -> float | None:
        for g in self.optimizer.param_groups:
            if any(p is param for p in g["params"]):
                return float(g["lr"])
        return None

    # -- before optimizer.step(): snapshots and gradient noise at the pre-update weights --
    @torch.no_grad()
    def before_step(self, step: int) -> None:
        t0, snap = time.perf_counter(), {"step": step, "cost_s": {}}
        if self.cfg.geometry:
            snap["before"] = {id(m.param): m.param.detach().clone() for m in self.matrices}
            snap["grad"] = {id(m.param): (m.param.grad.detach().clone() if m.param.grad is not None else None)
                            for m in self.matrices}
            snap["eff_before"] = {id(m.param): m.pc.effective_weight().detach().clone() for m in self.matrices if m.pc}
            snap["cost_s"]["geometry"] = time.perf_counter() - t0
        if self.cfg.hessian:  # every parameter and the probe gradient, for the step's curvature along itself
            t1 = time.perf_counter()
            snap["all_before"] = [p.detach().clone() for p in self.params]
            with torch.enable_grad(), self._probe_mode():
                x, y = self._probe_batch()
                snap["probe_grad"] = [g.detach() for g in torch.autograd.grad(self.model(x, y)[1], self.params)]
            snap["cost_s"]["hessian_step"] = time.perf_counter() - t1
        if self.cfg.noise:
            t1 = time.perf_counter()
            with torch.enable_grad():
                snap["noise"] = self._noise(step)
            snap["cost_s"]["noise"] = time.perf_counter() - t1
        self._snap = snap
        self.total_s += time.perf_counter() - t0

    def _pieces(self, step: int):
        """The step's sequences on this process as pieces: its micro-batches, or the one micro-batch cut."""
        mb = self.t.micro_batch_size
        if self.grad_accum >= 2:
            for micro in range(self.grad_accum):
                yield self.data.train_batch(step - 1, micro, mb, self.grad_accum, self.rank, self.world)
            return
        x, y = self.data.train_batch(step - 1, 0, mb, 1, self.rank, self.world)
        size = mb // self.cfg.noise_pieces
        for i in range(self.cfg.noise_pieces):
            yield x[i * size:(i + 1) * size], y[i * size:(i + 1) * size]

    def _noise(self, step: int) -> dict[str, Any]:
        from runtime.device import autocast  # the training forward's precision

        was_training = self.model.training
        self.model.train()  # the same mode as the training forward (no dropout in these models)
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        sq_param = [0.0] * len(self.params)
        sq_rows = {m.key: 0.0 for m in self.matrices}
        index = {id(p): i for i, p in enumerate(self.params)}
        k, tokens = 0, 0
        for x, y in self._pieces(step):
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device, self.precision):
                _, loss = self.model(x, y)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for i, g in enumerate(grads):
                if g is None:
                    continue
                g = g.double()
                sums[i] += g
                sq_param[i] += float(g.square().sum())
            for m in self.matrices:
                g = grads[index[id(m.param)]]
                if g is not None:
                    sq_rows[m.key] += float(g[m.rows].double().square().sum())
            k, tokens = k + 1, y.numel()
        self.model.train(was_training)
        per = {m.key: noise_stats(sums[index[id(m.param)]][m.rows], sq_rows[m.key], k, tokens)["noise_to_signal"]
               for m in self.matrices}
        flat = torch.cat([s.flatten() for s in sums])
        return {"pieces": k, "piece_tokens": tokens, **noise_stats(flat, sum(sq_param), k, tokens), "per_matrix": per}

    # -- after the step: geometry of the applied update, curvature at the new weights --
    def after_step(self, step: int, tokens: int) -> dict[str, Any]:
        t0, snap = time.perf_counter(), self._snap
        self._snap = {}
        if snap.get("step") != step:
            raise RuntimeError(f"diagnostics: after_step({step}) without before_step at that step")
        cost = dict(snap["cost_s"])
        rec: dict[str, Any] = {"step": step, "tokens": tokens, "lr": float(self.optimizer.param_groups[0]["lr"])}
        matrices: dict[str, dict[str, Any]] = {}
        if self.cfg.geometry:
            t1 = time.perf_counter()
            with torch.no_grad():
                for m in self.matrices:
                    pid = id(m.param)
                    grad = snap["grad"][pid]
                    entry = {"role": m.role, "layer": m.layer, "shape": list(m.param[m.rows].shape),
                             **update_stats(snap["before"][pid][m.rows], m.param.detach()[m.rows],
                                            grad[m.rows] if grad is not None else None, self.lr_of(m.param))}
                    if m.pc is not None:
                        eff = update_stats(snap["eff_before"][pid][m.rows], m.pc.effective_weight().detach()[m.rows],
                                           None, self.lr_of(m.param), prefix="eff_")
                        entry.update({k: v for k, v in eff.items() if k != "eff_cos_update_grad"})
                    matrices[m.key] = entry
            cost["geometry"] = cost.get("geometry", 0.0) + time.perf_counter() - t1
        if "noise" in snap:
            noise = dict(snap["noise"])
            for key, value in noise.pop("per_matrix").items():
                matrices.setdefault(key, {})["grad_noise_to_signal"] = value
            rec["noise"] = noise
        if matrices:
            rec["matrices"] = matrices
            rec["roles"] = role_means(matrices)
        if self.cfg.hessian:
            rec["hessian"] = self._hessian(step, rec["lr"], cost, snap)
        rec["cost_s"] = cost
        self.total_s += time.perf_counter() - t0
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(finite_or_none(rec), allow_nan=False) + "\n")
        return rec

    def _probe_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(iter(self.data.val_batches(self.cfg.probe_batch_size)))
        return x.to(self.device), y.to(self.device)

    @contextlib.contextmanager
    def _probe_mode(self):
        """Eval mode, fp32 with autocast off, the math attention kernel and the unfused LM head + loss (the
        fused CPU / flash attention kernels and the fused head have no double backward); restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with sdpa_kernel(SDPBackend.MATH), torch.autocast(self.device.type, enabled=False), \
                    differentiable_loss():
                yield
        finally:
            self.model.train(was_training)

    def _hessian(self, step: int, lr: float, cost: dict[str, float], snap: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        x, y = self._probe_batch()
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        with self._probe_mode(), torch.enable_grad():
            t0 = time.perf_counter()
            _, loss = self.model(x, y)
            hvp = HVP(loss, self.params)
            out = {"probe_loss": float(loss.detach()),
                   **top_algebraic_eigenvalue(hvp, self.params, gen, c.power_iters, c.power_tol)}
            lam = out["lambda_max"]
            out.update(lr=lr, two_over_lr=2 / lr if lr else None, sharpness_x_lr_over_2=lam * lr / 2)
            cost["hessian_top"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            out.update(step_curvature(hvp, [p.detach() - b for p, b in zip(self.params, snap["all_before"])],
                                      snap["probe_grad"]))
            cost["hessian_step"] = cost.get("hessian_step", 0.0) + time.perf_counter() - t0
            if c.trace_samples:
                t0 = time.perf_counter()
                out["trace"], out["trace_se"] = hutchinson_trace(hvp, self.params, gen, c.trace_samples)
                cost["hessian_trace"] = time.perf_counter() - t0
            if c.block_samples:
                t0 = time.perf_counter()
                out["block_offdiag_share"] = block_offdiag_share(hvp, self.params, self.block_of, gen,
                                                                 c.block_samples)
                out["blocks"], out["n_blocks"] = c.blocks, len(set(self.block_of))
                cost["hessian_blocks"] = time.perf_counter() - t0
            out["hvp_calls"] = hvp.calls
            del hvp
        return out

    def truncate(self, step: int) -> None:
        """On resume: keep the records of steps <= step (those after the checkpoint are recomputed)."""
        if not self.write or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def role_means(matrices: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per role (and "all"): the mean over the matrices of every numeric statistic."""
    groups: dict[str, list[dict]] = {}
    for entry in matrices.values():
        groups.setdefault(entry.get("role", "?"), []).append(entry)
        groups.setdefault("all", []).append(entry)
    out = {}
    for role, entries in groups.items():
        keys = {k for e in entries for k, v in e.items() if isinstance(v, (int, float)) and k != "layer"}
        out[role] = {}
        for k in sorted(keys):
            vals = [e[k] for e in entries if isinstance(e.get(k), (int, float)) and math.isfinite(e[k])]
            out[role][k] = sum(vals) / len(vals) if vals else None
    return out


def flat_for_wandb(rec: dict[str, Any]) -> dict[str, float]:
    """diag/<section>/<name>/<stat> scalars of one record (step excluded)."""
    out = {}
    for section in ("matrices", "roles"):
        for name, stats in rec.get(section, {}).items():
            out.update({f"diag/{section}/{name}/{k}": v for k, v in stats.items() if isinstance(v, (int, float))
                        and k != "layer"})
    for section in ("noise", "hessian", "cost_s"):
        out.update({f"diag/{section}/{k}": v for k, v in rec.get(section, {}).items() if isinstance(v, (int, float))})
    return out

