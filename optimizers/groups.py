"""The single place where trainable parameters are split into the groups every optimizer sees.

Models declare one role per parameter (`model.param_roles()`, e.g. "attn_q", "mlp_down", "embed", "norm")
and a role -> group table; this module turns that into four groups:

    hidden     2-D weight matrices inside the blocks (what Muon-like methods orthogonalize)
    embedding  token and position embeddings (including a tied input/output embedding)
    head       an untied output projection
    gain_bias  norm gains, biases and other scalars/vectors

Every trainable parameter must be claimed exactly once (checked here, as in modded-nanogpt's assertion),
and the per-group counts are printed at start.

A hidden parameter may hold several matrices: GPT-2's fused attention projection `c_attn` stacks Q, K and
V (3d x d). `row_blocks` says which rows form each matrix, and `matrix_group` builds the param group a matrix
method steps, with qkv="split" (default: each block its own matrix, as modded-nanogpt, which stores them
apart, and the Newton-Muon reference, which splits c_attn before Newton-Schulz) or qkv="fused" (the
stacked 3d x d matrix as one, the ablation).
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch

GROUPS = ("hidden", "embedding", "head", "gain_bias")
QKV_MODES = ("split", "fused")


@dataclass
class ParamInfo:
    name: str
    param: torch.nn.Parameter
    role: str


@dataclass
class ParamSplit:
    groups: dict[str, list[ParamInfo]] = field(default_factory=lambda: {g: [] for g in GROUPS})
    # The model's attention layout, for optimizers that partition by head (Adam-mini):
    # {"n_head", "n_kv_head", "head_dim"}; empty when the model declares none.
    layout: dict[str, int] = field(default_factory=dict)

    def infos(self, group: str | None = None) -> list[ParamInfo]:
        """ParamInfo (name, param, role) of one group, or of all groups in GROUPS order."""
        return list(self.groups[group]) if group else [i for g in GROUPS for i in self.groups[g]]

    def params(self, group: str) -> list[torch.nn.Parameter]:
        return [p.param for p in self.groups[group]]

    def only(self, *groups: str) -> ParamSplit:
        """The same split with every other group emptied (a whole-model method restricted to some groups)."""
        return ParamSplit({g: list(v) if g in groups else [] for g, v in self.groups.items()}, dict(self.layout))

    def decay_param_groups(self, weight_decay: float, decay_groups: Collection[str],
                           groups: Iterable[str] = GROUPS) -> list[dict]:
        """Param groups of the named groups that hold parameters, each with weight_decay on `decay_groups`
        and 0 on the others."""
        return [{"params": self.params(g), "group": g,
                 "weight_decay": weight_decay if g in decay_groups else 0.0}
                for g in groups if self.groups[g]]

    def counts(self) -> dict[str, tuple[int, int]]:
        """group -> (number of tensors, number of scalars)."""
        return {g: (len(ps), sum(p.param.numel() for p in ps)) for g, ps in self.groups.items()}

    def describe(self) -> str:
        return "\n".join(f"  {g:<10} {n:>4} tensors {k:>14,} params" for g, (n, k) in self.counts().items())


def group_names_problem(names: Iterable[str]) -> str | None:
    """Why `names` (a spec's decay_groups) are not all groups of GROUPS, or None: a knob's check."""
    unknown = set(names) - set(GROUPS)
    return f"unknown groups {sorted(unknown)} (known: {GROUPS})" if unknown else None


def split_parameters(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    roles: Mapping[str, str],
    role_group: Mapping[str, str],
    layout: Mapping[str, int] | None = None,
) -> ParamSplit:
    """Assign every trainable parameter to one group through its declared role.

    Raises ValueError if a trainable parameter has no role, a role has no group, the same tensor appears
    twice, or a role is declared for a parameter that does not exist (a stale declaration).
    """
    split, seen, names = ParamSplit(layout=dict(layout or {})), set(), set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if id(p) in seen:
            raise ValueError(f"parameter {name} is claimed twice (shared tensor listed under two names)")
        if name not in roles:
            raise ValueError(f"parameter {name} has no declared role")
        role = roles[name]
        if role_group.get(role) not in GROUPS:
            raise ValueError(f"parameter {name}: role {role!r} maps to no group of {GROUPS}")
        if role_group[role] == "hidden" and p.ndim != 2:
            raise ValueError(f"parameter {name}: role {role!r} is a hidden matrix but has shape {tuple(p.shape)}")
        seen.add(id(p))
        names.add(name)
        split.groups[role_group[role]].append(ParamInfo(name, p, role))
    stale = set(roles) - names
    if stale:
        raise ValueError(f"roles declared for parameters that are not trainable or do not exist: {sorted(stale)}")
    return split


def require_matrices(optimizer_name: str, params) -> None:
    """Matrix methods (Muon, PolarGrad, SOAP) are defined on 2-D weights only; refuse anything else."""
    for p in params:
        if p.ndim != 2:
            raise ValueError(f"{optimizer_name} takes 2-D matrices only; got a parameter of shape {tuple(p.shape)} "
                             "(give embeddings, gains and biases to AdamW)")


def row_blocks(role: str, shape: tuple[int, ...], layout: Mapping[str, int]) -> tuple[int, ...]:
    """Row counts of the matrices a hidden parameter holds, top to bottom: a fused [q; k; v] weight gives
    (n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim) (a third each without a layout), any
    other matrix one block of all its rows."""
    if role != "attn_qkv":
        return (shape[0],)
    q = layout.get("n_head", 0) * layout.get("head_dim", 0) or shape[0] // 3
    kv = (shape[0] - q) // 2
    if q + 2 * kv != shape[0] or kv <= 0:
        raise ValueError(f"a fused q/k/v weight of shape {tuple(shape)} does not split as [q; k; v] with "
                         f"layout {dict(layout)}")
    return (q, kv, kv)


def matrix_group(infos: Iterable[ParamInfo], layout: Mapping[str, int], qkv: str = "split", **options) -> dict:
    """A param group of hidden matrices for a matrix method: "params" and, per parameter, "row_blocks" (the
    rows of each matrix it holds, `row_blocks`; one block per parameter with qkv="fused"); `options` join the
    group dict (e.g. Newton-Muon's block_wide)."""
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv: {qkv!r} is not one of {', '.join(QKV_MODES)}")
    infos = list(infos)
    blocks = [row_blocks(i.role, tuple(i.param.shape), layout) if qkv == "split" else (i.param.shape[0],)
              for i in infos]
    return {"params": [i.param for i in infos], "group": "hidden", "row_blocks": blocks, **options}


def check_row_blocks(group: dict) -> None:
    """A group's "row_blocks" (if any) must give each parameter blocks that sum to its rows."""
    blocks = group.get("row_blocks")
    if blocks is None:
        return
    if len(blocks) != len(group["params"]):
        raise ValueError(f"row_blocks: {len(blocks)} entries for {len(group['params'])} parameters")
    for p, rows in zip(group["params"], blocks):
        if sum(rows) != p.shape[0] or min(rows) <= 0:
            raise ValueError(f"row_blocks: {tuple(rows)} do not split the {p.shape[0]} rows of a "
                             f"{tuple(p.shape)} matrix")
    group["row_blocks"] = [tuple(r) for r in blocks]


def matrices_with_grad(group: dict) -> list[tuple[torch.Tensor, tuple[int, ...] | None]]:
    """(parameter, its "row_blocks" or None for one matrix) for each parameter of `group` with a gradient."""
    blocks = group.get("row_blocks") or [None] * len(group["params"])
    return [(p, rows) for p, rows in zip(group["params"], blocks) if p.grad is not None]


def split_rows(tensors: Iterable[torch.Tensor], pieces: Iterable[list[slice]]) -> list[torch.Tensor]:
    """The matrices the tensors hold, in order: each tensor's rows cut by its `row_slices` (views)."""
    return [t[r] for t, sl in zip(tensors, pieces) for r in sl]


def join_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The per-matrix pieces of one parameter stacked back along the rows (one piece: itself)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_slices(rows: tuple[int, ...] | None, total: int) -> list[slice]:
    """The row ranges of the matrices a parameter holds (`rows`: their row counts; None: one matrix)."""
    if rows is None or len(rows) == 1:
        return [slice(None)]
    bounds = [0, *itertools.accumulate(rows)]
    if bounds[-1] != total:
        raise ValueError(f"row blocks {tuple(rows)} do not cover {total} rows")
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]
