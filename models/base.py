"""What every model family shares: role declarations and the `CausalLM` base class.

A layer declares its role where it is built (`declare(nn.Linear(...), "attn_qkv")`, or `linear(cfg, ...)`,
which builds a PC layer where `cfg.pc_level` asks for one) and `collect_roles` reads the declarations back,
failing if any parameter is unclaimed. `CausalLM` derives initialisation, parameter counts and FLOPs from
roles.

    python -c "from models import ModelConfig, build_model; print(build_model(ModelConfig()).param_roles())"
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ROLE_GROUP, ROLES, ModelConfig
from models.pc import PCLinear, pc_applies, pc_layers


def declare(module: nn.Module, role: str) -> nn.Module:
    """Give `module.weight` the role `role`; its bias, if any, gets the role "bias"."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    module.role = role
    return module


def linear(cfg: ModelConfig, d_in: int, d_out: int, role: str, bias: bool = True,
           blocks: int = 1) -> nn.Linear:
    """A declared (d_in -> d_out) linear layer: a PCLinear when the config preconditions `role`, with
    `blocks` row blocks preconditioned separately (GPT-2's fused QKV: 3), else a plain nn.Linear."""
    if pc_applies(cfg, role):
        return declare(PCLinear(d_in, d_out, bias, level=cfg.pc_level, power_iters=cfg.pc_power_iters,
                                blocks=blocks), role)
    return declare(nn.Linear(d_in, d_out, bias), role)


def collect_roles(model: nn.Module) -> dict[str, str]:
    """Map each name of `model.named_parameters()` to its declared role; every parameter must be declared."""
    declared = {}
    for prefix, module in model.named_modules():
        role = getattr(module, "role", None)
        if role is None:
            continue
        # A LayerNorm's bias is a bias; its weight (the gain) carries the module's role "norm". A module
        # may name roles for its other parameters (PCLinear: gamma -> "pc_gain"); any parameter left
        # stays undeclared and is reported below.
        local_roles = {"weight": role, "bias": "bias", **getattr(module, "local_roles", {})}
        for local, _ in module.named_parameters(recurse=False):
            if local in local_roles:
                declared[f"{prefix}.{local}" if prefix else local] = local_roles[local]
    names = [name for name, _ in model.named_parameters()]
    missing = sorted(set(names) - set(declared))
    if missing:
        raise RuntimeError(f"parameters without a declared role: {missing}")
    return {name: declared[name] for name in names}


class CausalLM(nn.Module):
    """Base of GPT2 and Llama: subclasses set `cfg`, `tied_head` and build layers with `declare`."""

    cfg: ModelConfig
    tied_head: bool  # True when the token embedding is also the output head (GPT-2)

    def param_roles(self) -> dict[str, str]:
        return collect_roles(self)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step: PC layers refresh their spectral-norm
        estimate on the updated weights (docs/optimizers.md 6.2); a no-op for plain models."""
        for layer in pc_layers(self):
            layer.refresh()

    def attn_layout(self) -> dict:
        return {"n_head": self.cfg.n_head, "n_kv_head": self.cfg.kv_heads, "head_dim": self.cfg.head_dim}

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) matrices, unit gains, zero biases; the two projections that write into the
        residual stream (attn_out, mlp_down) get std / sqrt(2 * n_layer) (GPT-2 paper, section 2.3).
        PC layers: gains γ = 1, and u, v drawn after all weights, so W equals the plain model's W."""
        std = self.cfg.init_std
        for name, role in self.param_roles().items():
            p = self.get_parameter(name)
            if role in ("norm", "pc_gain"):
                p.fill_(1.0)
            elif role == "bias":
                p.zero_()
            elif role in ("attn_out", "mlp_down"):
                p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)
        for layer in pc_layers(self):
            layer.reset_estimate()

    def num_params(self, non_embedding: bool = False) -> int:
        """All parameters; with non_embedding, minus the lookup tables (position embeddings, and the
        token embedding unless it is tied to the head, where it is a matmul weight: nanoGPT's count)."""
        roles = self.param_roles()
        n = 0
        for name, p in self.named_parameters():
            lookup = ROLE_GROUP[roles[name]] == "embedding" and not (roles[name] == "embed" and self.tied_head)
            n += 0 if non_embedding and lookup else p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token = 6 * N_matmul + 6 * n_layer * d_model * seq_len.

        N_matmul counts every weight used in a matmul, the LM head included (= non-embedding parameters
        minus gains and biases); 6 = 2 (multiply-add) x 3 (forward + backward). Attention scores and the
        weighted sum cost 2 * 2 * d_model * (t + 1) forward for the token at position t; averaged over a
        causal sequence that is 2 * d_model * seq_len (dropping the +1), times 3 for training. PaLM's
        (and nanoGPT's MFU) 12 * n_layer * d_model * seq_len also counts the masked half of the scores."""
        roles = self.param_roles()
        gains = sum(p.numel() for name, p in self.named_parameters() if ROLE_GROUP[roles[name]] == "gain_bias")
        n_matmul = self.num_params(non_embedding=True) - gains
        return 6.0 * n_matmul + 6.0 * self.cfg.n_layer * self.cfg.d_model * seq_len

    def pc_flops_per_forward(self) -> float:
        """Extra FLOPs of the PC polynomials in one forward pass (docs/optimizers.md 6.5), 0 without PC.

        Per wrapped matrix: 4·M·k² + 2·(level - 1)·k³ (M, k = larger, smaller side). Independent of the
        number of tokens, so not part of flops_per_token: it is paid once per forward, i.e. per micro-batch
        (grad_accum times per step), and backward adds about 2x. The power-iteration refresh after each
        optimizer step adds 4·out·in·pc_power_iters per matrix, not counted here."""
        return float(sum(layer.poly_flops() for layer in pc_layers(self)))

    def check_length(self, idx: torch.Tensor) -> None:
        if idx.size(1) > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.size(1)} exceeds model.block_size={self.cfg.block_size}")

    def head_and_loss(self, x: torch.Tensor, weight: torch.Tensor,
                      targets: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The LM head x W^T and the loss: (logits, loss). CPU training (gradients on), in fp32 or under bf16
        autocast, takes the fused, chunked head + cross-entropy (LinearCrossEntropy below; its matmuls in bf16
        under autocast, as F.linear's would be), which never holds the N x V logits and returns (None, loss):
        training callers use the loss only. `differentiable_loss()` (or targets None, no_grad, a GPU, another
        autocast dtype) gives the logits and the plain loss."""
        if targets is not None and fused_head_applies(x, weight):
            dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), weight, targets.flatten(), dtype)
        logits = F.linear(x, weight)
        return logits, self.loss(logits, targets)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
        """Mean next-token cross-entropy over (B, T), computed in fp32 even under bf16 autocast. On CPU a
        fused version (CrossEntropy below) that skips two N x V passes of F.cross_entropy."""
        if targets is None:
            return None
        logits, targets = logits.float().flatten(0, 1), targets.flatten()
        if logits.device.type == "cpu" and logits.requires_grad:
            return CrossEntropy.apply(logits, targets)
        return F.cross_entropy(logits, targets)


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (N, V) logits against (N,) class ids: loss = mean(logsumexp(z) - z[y]), gradient
    (softmax(z) - onehot(y)) / N. F.cross_entropy materialises the N x V log-probabilities in the forward and
    fills an N x V zero tensor for the one-hot in the backward; here the forward keeps only the N row
    log-sum-exps and the backward writes the gradient in one tensor (sub, exp, scatter, scale in place).
    Same values to float rounding (tests/test_models.py); about 5% of a CPU training step at cpu_small."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - logits.gather(1, targets[:, None]).squeeze(1)).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph (Hessian-vector products): a differentiable gradient
            onehot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
            return (torch.softmax(logits, dim=-1) - onehot) * (grad / logits.shape[0]), None
        out = torch.sub(logits, lse[:, None]).exp_()
        out.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
        return out.mul_(grad / logits.shape[0]), None


_DIFFERENTIABLE = [False]


@contextlib.contextmanager
def differentiable_loss():
    """Inside: the model's loss supports double backward (create_graph, Hessian-vector products), i.e. the
    head is a plain matmul into CrossEntropy, not the fused LinearCrossEntropy (its gradient is computed in
    the forward, a constant to autograd)."""
    _DIFFERENTIABLE[0], before = True, _DIFFERENTIABLE[0]
    try:
        yield
    finally:
        _DIFFERENTIABLE[0] = before


def fused_head_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether head_and_loss takes LinearCrossEntropy: CPU training (gradients on and wanted, outside
    `differentiable_loss()`) with fp32 parameters, either in fp32 with autocast off or under CPU bf16 autocast,
    where x may arrive in fp32 (GPT-2's LayerNorm and Llama's RMSNorm return fp32 there) or bf16. Other
    autocast dtypes (CPU fp16) keep the plain head: the fused one mirrors only bf16's rounding."""
    if not (x.device.type == "cpu" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
            and weight.dtype == torch.float32 and not _DIFFERENTIABLE[0]):
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.float32


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the logits x W^T ((N, C) x (V, C)) against (N,) class ids, chunked over tokens,
    with the gradients computed in the forward (Liger-Kernel's fused linear cross-entropy, for the CPU). Per
    chunk of 512 rows: z = x_c W^T, m = max z, e = exp(z - m) in place, s = sum e, loss += m + log s - z[y],
    then e becomes the gradient (e / s - onehot) / N in place, dx_c = e W and dW += e^T x_c. The chunk (8 MB
    of logits at 4,096 words) stays in cache through its five passes, which F.linear + cross-entropy make over
    the whole N x V tensor in memory; one exp instead of two; the full logits never exist. `make perf` measures
    it against F.linear + cross-entropy (results/perf/<preset>.json: fused_head). Same values to float rounding
    (tests/test_models.py). The backward only scales the saved gradients, so it has no double
    backward: a create_graph backward through it raises (use `differentiable_loss()`).

    `dtype` bf16 (head_and_loss under CPU bf16 autocast) rounds where autocast's F.linear + fp32 loss does:
    the three matmuls take bf16 operands and give bf16 results (torch's CPU mm has no fp32 output for bf16
    operands), z is converted to fp32 for the max, exp, log-sum-exp and softmax, e back to bf16 for dx and dW.
    Autocast is off inside, so these casts are all there is. dx comes back in x's dtype, dW in fp32, each
    chunk's bf16 e^T x_c summed in fp32 (the plain path rounds the whole sum to bf16 once). Forward +
    backward of the head alone, 4,096 tokens x 128, one thread, AMD EPYC: 0.6-0.75x the plain bf16 path's
    time at 512 words, 0.5x at 4,096 (measured by hand, not by `make perf`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = x.shape[0]
        # Rows per chunk. Each chunk also reads and writes all of dW (V x C), so small chunks lose at a large
        # vocabulary; a chunk of 512 rows keeps its logits in cache at the benchmark's vocabulary.
        rows = 512
        bf16 = dtype == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            xm, wm = x.to(dtype), weight.to(dtype)  # no copies in fp32
            dx = torch.empty_like(xm) if ctx.needs_input_grad[0] else None
            dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32)
            for s in range(0, n, rows):
                xc, yc = xm[s:s + rows], targets[s:s + rows, None]
                z = (xc @ wm.T).float()
                m = z.amax(1, keepdim=True)
                zy = z.gather(1, yc)
                e = z.sub_(m).exp_()
                ssum = e.sum(1, keepdim=True)
                total += (m + ssum.log() - zy).sum()
                e.mul_(ssum.mul_(n).reciprocal_())  # softmax / N
                e.scatter_add_(1, yc, torch.full_like(m, -1.0 / n))
                e = e.to(dtype)
                if dx is not None:
                    torch.mm(e, wm, out=dx[s:s + rows])
                if dw is not None:
                    if bf16:
                        dw += e.T @ xc
                    else:
                        dw.addmm_(e.T, xc)
            if dx is not None:
                dx = dx.to(x.dtype)
        ctx.save_for_backward(dx, dw)
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError("LinearCrossEntropy has no double backward: build the loss under "
                               "models.base.differentiable_loss() for create_graph / Hessian-vector products")
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad), (None if dw is None else dw * grad), None, None
