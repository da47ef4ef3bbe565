"""Hyperparameters stated once: on the spec dataclass, each field declares its default and its constraint
together (`knob`); `validate` checks them all with one-line errors naming the key, and `SpecOptimizer` is the
torch optimizer built from a spec, whose param-group knobs become its `defaults` (nothing restated).

    @dataclass
    class LionSpec(Spec):
        lr: float = knob(3e-4, gt=0)  # peak lr
        betas: list[float] = knob([0.9, 0.99], pair_in=(0, 1))

    LionSpec(lr=0).validate()   # ValueError: optimizer.lr: must be > 0 (got 0)

A knob is a param-group hyperparameter (in every group's dict, where the schedule writes lr) unless declared
param_group=False: then the optimizer reads it from `self.spec`, or only the spec's build() uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

KNOB = "knob"  # the dataclass-field metadata key holding a field's Knob


@dataclasses.dataclass(frozen=True)
class Knob:
    """A spec field's declaration besides its default: what values it accepts (bounds gt/ge below, lt/le
    above; `choices`: names; `pair_in=(lo, hi)`: two values in [lo, hi); `check(value)`: the problem in words
    or None; `nullable`: None is accepted too) and whether it is a param-group hyperparameter."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: Sequence[str] | None = None
    pair_in: tuple[float, float] | None = None
    check: Callable[[Any], str | None] | None = None
    nullable: bool = False
    param_group: bool = True

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, as the text after "<key>: ", or None if it is accepted."""
        if value is None and self.nullable:
            return None
        if isinstance(value, float) and math.isinf(value):  # inf passes a lower bound, yet means nothing
            return f"must be a finite number (got {value})"
        within = ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                  and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))
        if not within:  # NaN too
            return f"must be {self.bounds()}{' or null' if self.nullable else ''} (got {value})"
        if self.choices is not None and value not in self.choices:
            return f"{value!r} is not one of {', '.join(self.choices)}"
        if self.pair_in is not None:
            lo, hi = self.pair_in
            if len(value) != 2 or not all(lo <= v < hi for v in value):
                return f"need two values in [{lo:g}, {hi:g}) (got {list(value)})"
        return self.check(value) if self.check is not None else None

    def bounds(self) -> str:
        """The accepted range in words, e.g. "> 0", ">= 1", "in [0, 1)"."""
        low = ("(", self.gt) if self.gt is not None else ("[", self.ge) if self.ge is not None else None
        high = (")", self.lt) if self.lt is not None else ("]", self.le) if self.le is not None else None
        if low and high:
            return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
        if low:
            return f"{'>' if low[0] == '(' else '>='} {low[1]:g}"
        return f"{'<' if high[0] == ')' else '<='} {high[1]:g}"


def knob(default: Any, **declaration: Any) -> Any:
    """A spec field: its `default` (a list is copied for each instance) and its Knob (the keywords)."""
    metadata = {KNOB: Knob(**declaration)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda items=tuple(default): list(items), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def validate(spec: Any, key: str = "optimizer") -> None:
    """Raise ValueError("<key>.<field>: <problem>") for the first field (in declaration order) that breaks its
    knob's constraint; a nested spec (a dataclass field, e.g. `aux`) is checked, in its place, by its own
    validate("<key>.<field>"). An empty key gives "<field>: <problem>"."""
    prefix = f"{key}." if key else ""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        declared = f.metadata.get(KNOB)
        problem = declared.problem(value) if declared is not None else None
        if problem:
            raise ValueError(f"{prefix}{f.name}: {problem}")
        if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            value.validate(f"{prefix}{f.name}")


def non_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN or infinite float in `value` (a config dataclass, a spec, dict or list,
    walked in order), or None. No setting of a run means anything at inf or NaN (optimizer.lr=inf would
    diverge at step 2)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = non_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def param_group_defaults(spec: Any) -> dict[str, Any]:
    """The spec's param-group knobs, {name: value} in declaration order, lists as tuples (as torch keeps
    betas): the `defaults` of the optimizer it builds."""
    out = {}
    for f in dataclasses.fields(spec):
        declared = f.metadata.get(KNOB)
        if declared is not None and declared.param_group:
            value = getattr(spec, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


class Spec:
    """Base of the optimizer specs (dataclasses of knobs): `validate(key)` checks every knob. A cross-field
    check goes in an override that calls this one first."""

    def validate(self, key: str = "optimizer") -> None:
        """Raise ValueError("<key>.<field>: ...") for an impossible value (key = where this spec sits)."""
        validate(self, key)


class SpecOptimizer(torch.optim.Optimizer):
    """A torch optimizer built from its spec: `defaults` are the spec's param-group knobs (plus `extra`
    defaults a method keeps per group), its other knobs are read from `self.spec`. A group may override any
    default (the split's groups set their own weight_decay). `step(closure)` evaluates the closure with
    gradients on, then runs `update()`, the method's step of every group, without autograd."""

    def __init__(self, params, spec: Any, **extra: Any):
        self.spec = spec  # before the groups are added: add_param_group may read it
        super().__init__(params, {**param_group_defaults(spec), **extra})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.update()
        return loss

    def update(self) -> None:
        raise NotImplementedError
