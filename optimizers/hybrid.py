"""A matrix optimizer on the hidden matrices plus an auxiliary AdamW on everything else, stepped as one.

Muon-like methods are defined for 2-D hidden weights only; embeddings, the output head and gains/biases
go to AdamW (Keller Jordan's MuonWithAuxAdam, Moonlight). The split comes from optimizers/groups.py, the
same for every method, so a spec's build() is one line:

    return with_aux_adamw(Muon([matrix_group(split.infos("hidden"), split.layout, self.qkv)], self), split,
                          self.aux)

`CombinedOptimizer` steps the two as one; `aux_adamw` is the matrix methods' default auxiliary AdamW.

Protocol v2's shared group (`hybrid` in the run config, set by every benchmark): one AdamW with one set of
settings trains embeddings, head and gains/biases in every arm, so the arm under test owns only the hidden
matrices. `build_optimizer` applies it to any spec: a matrix method's own auxiliary AdamW is replaced by the
shared one, a whole-model method (AdamW, Adam-mini, Lion, a user's optimizer) is built on the hidden group
alone and paired with it. An external optimizer (optimizers/external.py) fits both forms: with `_params_: hidden`
it declares `aux`, with `_params_: all` it is a whole-model method. Without `hybrid` (a user's own run) every spec
builds as it declares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from optimizers.adamw import AdamWSpec
from optimizers.groups import ParamSplit

AUX_GROUPS = ("embedding", "head", "gain_bias")


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, behaving like one for the training loop.

    `param_groups` is the concatenation of the members' group dicts (the same dict objects, so the LR
    schedule's writes reach each member), and the state dict nests the members' by position. Methods the
    harness may call on a matrix optimizer (e.g. Newton-Muon's input statistics) are forwarded to the
    first member that has them.
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = [o for o in optimizers if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        """Step every member; `closure` (optimizers/external.py step_closure) goes only to the members that need
        one (`needs_closure`, e.g. torch.optim.LBFGS), stepped last so that the others use the step's own
        gradients, not those a closure re-evaluated. Returns the closure's last loss, or None."""
        loss = None
        for o in sorted(self.optimizers, key=lambda o: getattr(o, "needs_closure", False)):  # stable: in order
            if getattr(o, "needs_closure", False):
                loss = o.step(closure)
            else:
                o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"state holds {len(state['optimizers'])} optimizers, this one {len(self.optimizers)}")
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)

    def __getattr__(self, name: str):
        # Only reached for attributes CombinedOptimizer lacks: forward optional protocol methods to a member.
        for o in self.__dict__.get("optimizers", []):
            if hasattr(o, name):
                return getattr(o, name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        # an external optimizer's adapter (optimizers/external.py) by its class's name, e.g. (SGD, AdamW)
        return f"CombinedOptimizer({', '.join(type(getattr(o, 'inner', o)).__name__ for o in self.optimizers)})"


def with_aux_adamw(matrix: torch.optim.Optimizer, split: ParamSplit, aux: AdamWSpec) -> CombinedOptimizer:
    """`matrix` (already built over split.params("hidden")) plus AdamW over the other groups."""
    has_aux = any(split.groups[g] for g in AUX_GROUPS)
    return CombinedOptimizer(matrix, aux.build(split, groups=AUX_GROUPS) if has_aux else None)


def aux_adamw(**changes: Any) -> AdamWSpec:
    """A matrix method's own auxiliary AdamW (embeddings, a tied or untied head, gains/biases), for a user's
    runs; a benchmark replaces it by its shared group. AdamWSpec's defaults (lr 1e-3, a-priori) without decay,
    as Keller's aux Adam, so matrix methods differ only in their hidden-matrix rule; `changes` replace fields
    (SOAP: its own lr)."""
    return AdamWSpec(**{"weight_decay": 0.0, "decay_groups": ["embedding", "head"], **changes})


@dataclass
class SharedGroup:
    """The `hybrid` section of a run config: protocol v2's shared AdamW of embeddings, head and gains/biases.
    Off by default (each optimizer as its config declares); the values default to torch.optim.AdamW's own."""

    enabled: bool = False
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01  # decoupled, on decay_groups only (never gains/biases)
    decay_groups: list[str] = field(default_factory=lambda: ["embedding", "head"])
    fused: bool | None = None

    def adamw(self) -> AdamWSpec:
        return AdamWSpec(lr=self.lr, betas=list(self.betas), eps=self.eps, weight_decay=self.weight_decay,
                         decay_groups=list(self.decay_groups), fused=self.fused)

    def validate(self, key: str = "hybrid") -> None:
        """AdamW's checks; the shared group never owns (or decays) the hidden matrices."""
        self.adamw().validate(key)
        if "hidden" in self.decay_groups:
            raise ValueError(f"{key}.decay_groups: the shared group does not own the hidden matrices (the arm "
                             f"under test does); choose from {', '.join(AUX_GROUPS[:2])}")


def build_optimizer(spec: Any, split: ParamSplit, shared: SharedGroup | None = None) -> Any:
    """The run's optimizer: `spec.build(split)`, or with the shared group enabled (protocol v2) the spec on the
    hidden matrices and the shared AdamW on everything else. A spec with an `aux` AdamW (the matrix methods)
    gets the shared one in its place, so its build is unchanged; any other spec is built on the hidden group
    alone."""
    if shared is None or not shared.enabled:
        return spec.build(split)
    if isinstance(getattr(spec, "aux", None), AdamWSpec):
        return dataclasses.replace(spec, aux=shared.adamw()).build(split)
    return with_aux_adamw(spec.build(split.only("hidden")), split, shared.adamw())
