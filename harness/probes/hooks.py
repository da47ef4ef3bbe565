"""Layer inputs for optimizers that precondition with them (Newton-Muon), delivered through forward hooks.

An optimizer that wants inputs implements two methods:

    wants_inputs(step: int) -> bool            # step: 0-based index of the update about to be computed
    observe_input(weight: Parameter, x: Tensor)  # x: the (..., in_features) input of the layer using `weight`

The harness owns the hooks (docs/protocol.md: optimizers see only gradients and declared hooks): it registers
one forward hook on every nn.Linear whose weight is a hidden matrix, and switches them on only for the
micro-batches of a step for which the optimizer asked, so other steps and evaluation pay nothing.

    hooks = InputHooks.attach(model, optimizer, hidden_params)  # None if the optimizer wants no inputs
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn


class InputHooks:
    def __init__(self, optimizer, handles: list):
        self.optimizer, self.handles, self.active = optimizer, handles, False

    @classmethod
    def attach(cls, model: nn.Module, optimizer, hidden: Iterable[torch.Tensor]) -> InputHooks | None:
        if not callable(getattr(optimizer, "observe_input", None)):
            return None
        hidden_ids = {id(p) for p in hidden}
        hooks = cls(optimizer, [])
        covered = set()
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in hidden_ids:
                # the parameter as the optimizer holds it (under FSDP the module swaps in a gathered copy)
                hooks.handles.append(module.register_forward_hook(functools.partial(hooks._hook, module.weight)))
                covered.add(id(module.weight))
        missing = hidden_ids - covered
        if missing:
            raise ValueError(f"{type(optimizer).__name__} needs layer inputs, but {len(missing)} hidden matrices "
                             "are not the weight of an nn.Linear, so no hook can deliver them")
        return hooks

    def _hook(self, weight: torch.Tensor, module: nn.Linear, inputs: tuple[torch.Tensor, ...],
              output: torch.Tensor) -> None:
        if self.active and module.training:
            with torch.no_grad():
                self.optimizer.observe_input(weight, inputs[0].detach())

    def begin_step(self, step: int) -> None:
        self.active = bool(self.optimizer.wants_inputs(step))

    def end_step(self) -> None:
        self.active = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
