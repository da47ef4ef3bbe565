"""Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv:2406.16793): Adam with
the full first moment m but one second-moment scalar v_b per block of parameters, so the optimizer state is
about half of AdamW's. Here on every parameter group, with the v1.1 partition of the reference code
(github.com/zyushun/Adam-mini, adam_mini.py 1.1.1; docs/optimizers.md 4.3), taken from the declared roles:

    attn_q, attn_k          one block per attention head (a GQA key has n_kv_head blocks)
    attn_qkv                [q; k; v] rows: q and k per head, v per row (GPT-2's fused projection)
    attn_v, attn_out,       one block per output neuron (row)
    mlp_up/gate/down
    embed, head             one block per row (= per token)
    pos_embed               pos_embed="tensor" (default): one block for the whole table, as the reference;
                            pos_embed="row": one block per row (= per position)
    bias                    one block per element (full Adam), as the v1.1 reference code does
    anything else           one block per tensor (norm gains, future scalars such as a PC gain)

The reference matches parameter *names* by substring, which misreads fused projections (docs/optimizers.md 4.7);
roles make the partition explicit, and a head layout that does not fit the rows is an error. The position
embedding follows the reference by default: on the authors' GPT-2 example its name `transformer.wpe` matches
none of the reference's name lists (the embedding names are "embed", "embd", "wte"), so 1.1.1 puts it in the
"other" branch, one v for the whole tensor; tests/test_adam_mini.py checks the counts and the update against
the adam-mini 1.1.1 package. That follows from the name matching rather than from a documented choice, so the
option pos_embed="row" (optimizer.pos_embed=row) treats the table like the token embedding, one block per
row, for an ablation.

Update per block b (docs/optimizers.md 4.2), lr eta, betas (beta1, beta2), weight decay lambda, step t:

    W <- W (1 - eta lambda)                            (decoupled; not on gains and biases)
    m <- beta1 m + (1 - beta1) g
    v_b <- beta2 v_b + (1 - beta2) mean_{i in b} g_i^2
    W <- W - eta (m / (1 - beta1^t)) / (sqrt(v_b / (1 - beta2^t)) + eps)

    python train.py experiment=bench_tiny optimizer=adam_mini
    python train.py experiment=bench_tiny optimizer=adam_mini optimizer.pos_embed=row   # one v per position
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from optimizers.groups import GROUPS, ParamSplit
from optimizers.hparams import Spec, SpecOptimizer, knob

# A partition of one tensor: segments (n_blocks, rows_per_block) over the rows of the tensor viewed as
# (sum n_blocks * rows_per_block, -1); e.g. a GPT-2 fused QKV of d = 4 heads x 32 rows is
# ((4, 32), (4, 32), (128, 1)). One block of one row is the whole tensor; (numel, 1) is one per element.
Blocks = tuple[tuple[int, int], ...]

ROW_ROLES = ("attn_v", "attn_out", "mlp_up", "mlp_gate", "mlp_down", "embed", "head")
GRANULARITIES = ("block", "element")  # element: one v per entry, i.e. AdamW (a test of the maths)
POS_EMBEDS = ("tensor", "row")  # the position embedding: one v for the table (reference 1.1.1), or per row


def _heads(role: str, layout: Mapping[str, int], *keys: str) -> list[int]:
    missing = [k for k in (*keys, "head_dim") if not layout.get(k)]
    if missing:
        raise ValueError(f"Adam-mini: role {role!r} is split per head and needs the model's attention layout "
                         f"{missing} (ParamSplit.layout, from model.attn_layout()); got {dict(layout)}")
    return [layout[k] for k in (*keys, "head_dim")]


def _row_roles(pos_embed: str) -> tuple[str, ...]:
    return (*ROW_ROLES, "pos_embed") if pos_embed == "row" else ROW_ROLES


def partition(role: str, shape: Sequence[int], layout: Mapping[str, int], granularity: str = "block",
              pos_embed: str = "tensor") -> Blocks:
    """The v1.1 blocks of a tensor of `shape` with declared `role` (module docstring); raises ValueError
    when a per-head role's rows do not match the layout {"n_head", "n_kv_head", "head_dim"}, or for an unknown
    `granularity` or `pos_embed` ("tensor" or "row": how the position embedding is partitioned)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed: {pos_embed!r} is not one of {', '.join(POS_EMBEDS)}")
    row_roles = _row_roles(pos_embed)
    numel = 1
    for s in shape:
        numel *= s
    if granularity == "element" or role == "bias":
        return ((numel, 1),)
    if role in ("attn_q", "attn_k", "attn_qkv") or role in row_roles:
        if len(shape) != 2:
            raise ValueError(f"Adam-mini: role {role!r} is a matrix but has shape {tuple(shape)}")
        rows = shape[0]
    if role in ("attn_q", "attn_k"):
        heads, head_dim = _heads(role, layout, "n_head" if role == "attn_q" else "n_kv_head")
        if rows != heads * head_dim:
            raise ValueError(f"Adam-mini: role {role!r} has {rows} rows, not {heads} heads x head_dim "
                             f"{head_dim} = {heads * head_dim} (layout {dict(layout)})")
        return ((heads, head_dim),)
    if role == "attn_qkv":
        n_q, n_kv, head_dim = _heads(role, layout, "n_head", "n_kv_head")
        if rows != (n_q + 2 * n_kv) * head_dim:
            raise ValueError(f"Adam-mini: role 'attn_qkv' has {rows} rows, not [q; k; v] = (n_head {n_q} + "
                             f"2 x n_kv_head {n_kv}) x head_dim {head_dim} = {(n_q + 2 * n_kv) * head_dim}")
        return ((n_q, head_dim), (n_kv, head_dim), (n_kv * head_dim, 1))
    if role in row_roles:
        return ((rows, 1),)
    return ((1, 1),)


def rule_name(role: str, granularity: str = "block", pos_embed: str = "tensor") -> str:
    """How `partition` splits a role, in words (for the summary)."""
    if granularity == "element" or role == "bias":
        return "per element"
    return {"attn_q": "per head", "attn_k": "per kv head", "attn_qkv": "q,k per head; v per row",
            **dict.fromkeys(_row_roles(pos_embed), "per row")}.get(role, "per tensor")


def adam_mini_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, blocks: Blocks,
                     step: int, lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """One Adam-mini step of one tensor (docs/optimizers.md 4.2), in place on p, m (p's shape) and v (one scalar
    per block, in `blocks` order); `step` counts this update (1 for the first). The operations follow
    torch's single-tensor AdamW in order, so one block per element reproduces AdamW (to rounding)."""
    beta1, beta2 = betas
    rows = [n * r for n, r in blocks]
    R = sum(rows)
    # v_b <- beta2 v_b + mean_b((1 - beta2) g g): (1 - beta2) g g is formed as torch's AdamW forms it, so one
    # block per element is AdamW up to its CPU addcmul fusing the add (~1 ulp of v per step; tests).
    g2 = grad.mul(1 - beta2).mul_(grad).reshape(R, -1).split(rows)
    v.mul_(beta2).add_(torch.cat([s.reshape(n, -1).mean(dim=1) for s, (n, _) in zip(g2, blocks)]))
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
    denom = (v.sqrt() / bias_correction2**0.5).add_(eps)  # sqrt(v_b / (1 - beta2^t)) + eps, per block
    # Each block's denominator broadcasts over its rows: segment (n, r) is viewed as (n, r * cols).
    for P, M, D, (n, _) in zip(p.view(R, -1).split(rows), m.view(R, -1).split(rows),
                               denom.split([n for n, _ in blocks]), blocks):
        P.view(n, -1).addcdiv_(M.view(n, -1), D[:, None], value=-lr / bias_correction1)


class AdamMini(SpecOptimizer):
    """Adam-mini over param groups whose dicts carry "roles" (one declared role per parameter), with an
    AdamMiniSpec's hyperparameters (its pos_embed: the position embedding's partition, "tensor" (one block,
    the reference's) or "row"); the model's attention `layout` is needed for per-head roles. Each group gets
    "blocks", its parameters' partitions (saved with the state dict, so a loaded state always matches its v
    shapes).

    State per parameter: "step" (int), "m" (p's shape and dtype), "v" (one scalar per block, p's dtype,
    as torch's AdamW keeps its moments). `granularity="element"` makes every entry a block: AdamW exactly
    (a test of the maths, not a spec knob).
    """

    def __init__(self, params, spec: AdamMiniSpec, *, layout: Mapping[str, int] | None = None,
                 granularity: str = "block"):
        self.layout, self.granularity = dict(layout or {}), granularity
        super().__init__(params, spec)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        roles = group.get("roles")
        if roles is None or len(roles) != len(group["params"]):
            raise ValueError("AdamMini: each param group needs 'roles', one declared role per parameter "
                             f"(got {roles!r} for {len(group['params'])} parameters)")
        group["roles"] = list(roles)
        group["blocks"] = [partition(r, p.shape, self.layout, self.granularity, self.spec.pos_embed)
                           for p, r in zip(group["params"], roles)]

    def summary(self) -> str:
        """Per role: tensors, parameters and second-moment scalars (= blocks), and the totals vs AdamW."""
        rows: dict[str, list[int]] = {}
        for group in self.param_groups:
            for p, role, blocks in zip(group["params"], group["roles"], group["blocks"]):
                row = rows.setdefault(role, [0, 0, 0])
                row[0], row[1], row[2] = row[0] + 1, row[1] + p.numel(), row[2] + sum(n for n, _ in blocks)
        layout = self.layout or "none"
        title = f"v1.1, one v scalar per block; pos_embed {self.spec.pos_embed}; layout {layout}"
        lines = [f"Adam-mini partition ({title}):",
                 f"  {'role':<10} {'partition':<24} {'tensors':>7} {'params':>14} {'v scalars':>11}"]
        rules = {role: rule_name(role, self.granularity, self.spec.pos_embed) for role in rows}
        lines += [f"  {role:<10} {rules[role]:<24} {t:>7} {n:>14,} {b:>11,}"
                  for role, (t, n, b) in rows.items()]
        t, n, b = (sum(r[i] for r in rows.values()) for i in range(3))
        lines.append(f"  {'total':<35} {t:>7} {n:>14,} {b:>11,}  (state m + v = {(n + b) / (2 * n):.4f} "
                     "x AdamW's m + v)")
        return "\n".join(lines)

    def update(self) -> None:
        for group in self.param_groups:
            for p, blocks in zip(group["params"], group["blocks"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["v"] = p.new_zeros(sum(n for n, _ in blocks))
                state["step"] += 1
                adam_mini_update(p, p.grad, state["m"], state["v"], blocks=blocks, step=state["step"],
                                 lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                 weight_decay=group["weight_decay"])


@dataclass
class AdamMiniSpec(Spec):
    lr: float = knob(1e-3, gt=0)  # peak lr (the schedule multiplies it): AdamW's, as the README advises
    # AdamW's betas here, so the two compare at equal settings; the paper and reference code use (0.9, 0.999)
    betas: list[float] = knob([0.9, 0.95], pair_in=(0, 1))
    eps: float = knob(1e-8, gt=0)
    weight_decay: float = knob(0.1, ge=0)  # decoupled, on matrices, embeddings and head; never gains/biases
    # the position embedding's partition: "tensor" (reference 1.1.1: one v for the whole table) | "row"
    pos_embed: str = knob("tensor", choices=POS_EMBEDS, param_group=False)

    def build(self, split: ParamSplit) -> AdamMini:
        """Adam-mini over the four groups of the split, partitioned by role; prints the partition."""
        groups = [
            {"params": [i.param for i in infos], "roles": [i.role for i in infos], "group": g,
             "weight_decay": 0.0 if g == "gain_bias" else self.weight_decay}
            for g in GROUPS if (infos := split.infos(g))
        ]
        opt = AdamMini(groups, self, layout=split.layout)
        print(opt.summary())
        return opt
