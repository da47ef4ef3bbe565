"""Any `torch.optim.Optimizer` named by `_target_` in an optimizer YAML, unmodified: a user's class, torch's own,
or one of a zoo (pytorch-optimizer, schedulefree; `pip install -e ".[zoo]"`).

    # conf/optimizer/sgd.yaml (or optimizer/sgd.yaml in a directory of OPTBENCH_CONFIG_PATH)
    _target_: torch.optim.SGD
    lr: 0.1
    momentum: 0.9

    python train.py experiment=smoke optimizer=sgd optimizer.momentum=0.95 +optimizer.nesterov=true

The YAML's other keys are the class's keyword arguments, passed through (lists become tuples, as torch keeps
betas). Before any compute they are checked against the class's `__init__` signature (a key it does not name is
refused in one line, with "did you mean"), non-finite numbers are refused, and the class is built once on a
dummy 2x2 parameter, so that its own checks ("Invalid learning rate: -1") are one line too.

Reserved keys, underscore-wrapped like Hydra's `_target_` so that they never collide with a class's arguments:

    _params_   hidden (default): the class steps the hidden matrices, the harness's auxiliary AdamW
               (optimizers/hybrid.py aux_adamw) the embeddings, head and gains/biases, as for the matrix methods;
               all: the class steps every parameter, one param group per split group (weight_decay 0 on
               gains/biases when the class takes weight_decay; one group when it does not)
    _aux_      fields of that auxiliary AdamW (_params_: hidden only), e.g. {lr: 3.0e-3}
    _closure_  auto (default): step(closure) when the class's step() requires its closure (torch.optim.LBFGS);
               true / false to say so. The closure re-runs the step's forward and backward on the same batch.
    _strict_   true (default): a key the signature does not name is refused, even when it has **kwargs (named
               parameters are the contract); false passes such keys on to its **kwargs

With protocol v2's shared group (`hybrid.enabled`, every benchmark) the shared AdamW replaces `_aux_`, and a
`_params_: all` class is built on the hidden matrices alone (optimizers/hybrid.py build_optimizer): the arm
under test owns only the hidden matrices. The class sees each parameter whole (GPT-2's fused q/k/v weight as
one matrix). Optimizers with train()/eval() modes (Schedule-Free) are put in train mode when built; evaluation
and the saved final weights use `eval_weights(optimizer)` (the averaged x), after which training goes on from
the exact training weights. Records: summary.json's `optimizer_external` (class, resolved keyword arguments,
package version) and `closure_evals` (forward+backward evaluations made by closures: extra compute).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import inspect
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from optimizers.adamw import AdamWSpec
from optimizers.groups import GROUPS, ParamSplit
from optimizers.hparams import non_finite
from optimizers.hybrid import aux_adamw, with_aux_adamw

RESERVED = ("_params_", "_aux_", "_closure_", "_strict_")
PARAMS = ("hidden", "all")
CLOSURE = ("auto", True, False)


def is_external(cls: Any) -> bool:
    """A torch.optim.Optimizer subclass (what `_target_` may name besides the project's spec dataclasses)."""
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def arguments(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments of `cls.__init__` by name, in order (`self` and the parameters, its first argument
    whatever its name, left out)."""
    named = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return {p.name: p for p in named if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def takes_var_kwargs(cls: type) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def step_requires_closure(cls: type) -> bool | None:
    """True when `cls.step` has a `closure` parameter without a default, False when it has one with a default,
    None when it has none."""
    p = inspect.signature(cls.step).parameters.get("closure")
    return None if p is None else p.default is inspect.Parameter.empty


def _as_passed(value: Any) -> Any:
    """A YAML value as the class receives it: lists (at any depth) as tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_passed(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_passed(v) for k, v in value.items()}
    return value


def _recordable(value: Any) -> Any:
    """A keyword argument as JSON holds it: numbers, strings, booleans, None and lists of them; anything else
    (a dtype, an enum, a callable) as its str()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_recordable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _recordable(v) for k, v in value.items()}
    return str(value)


def _did_you_mean(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {close[0]}?" if close else ""


@dataclass
class ExternalSpec:
    """The typed spec of an external optimizer YAML: the class's dotted path, its keyword arguments as given
    (the other keys), and the reserved keys' values (module docstring). `validate` checks everything before
    any compute; `build(split)` returns the optimizer the loop steps."""

    supports_fsdp: ClassVar[bool] = False  # never tried on FSDP-sharded (DTensor) parameters: refused
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    params: str = "hidden"  # _params_
    closure: str | bool = "auto"  # _closure_
    strict: bool = True  # _strict_
    aux: AdamWSpec | None = field(default_factory=aux_adamw)  # _aux_; None with _params_: all

    @classmethod
    def from_node(cls, target: str, node: dict[str, Any], key: str = "optimizer") -> ExternalSpec:
        """The spec of an `optimizer` node without its `_target_`. Raises ValueError("<key>.<k>: ...") for an
        underscore-wrapped key that is not one of RESERVED and for a bad `_aux_` (typed as AdamWSpec)."""
        node = dict(node)
        for k in node:
            if k.startswith("_") and k.endswith("_") and k not in RESERVED:
                raise ValueError(f"{key}.{k}: not a reserved key of an external optimizer (reserved: "
                                 f"{', '.join(RESERVED)}){_did_you_mean(k, list(RESERVED))}")
        params, aux = node.pop("_params_", "hidden"), node.pop("_aux_", None)
        closure, strict = node.pop("_closure_", "auto"), node.pop("_strict_", True)
        if aux is not None and params != "hidden":
            raise ValueError(f"{key}._aux_: only with _params_: hidden (with _params_: {params} the class steps "
                             "every parameter)")
        try:  # typed as the matrix methods' `aux`: an unknown field or a wrong type is one line
            aux = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(aux_adamw()), aux or {}))
        except OmegaConfBaseException as e:
            raise ValueError(f"{key}._aux_.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
        return cls(target, {k: _as_passed(v) for k, v in node.items()}, params=params, closure=closure,
                   strict=strict, aux=aux if params == "hidden" else None)

    @property
    def name(self) -> str:
        """The class's name, as records and tables print the optimizer (e.g. SGD)."""
        return self.target.rpartition(".")[2]

    def optimizer_class(self) -> type:
        return get_class(self.target)  # as harness/config/validate.py resolves `_target_`

    def needs_closure(self) -> bool:
        return step_requires_closure(self.optimizer_class()) is True if self.closure == "auto" else bool(self.closure)

    def validate(self, key: str = "optimizer") -> None:
        """Raise ValueError("<key>.<k>: <problem>") for a reserved key's value, an argument the class does not
        take, a missing required one, a non-finite number, or arguments the class itself refuses."""
        if self.params not in PARAMS:
            raise ValueError(f"{key}._params_: {self.params!r} is not one of {', '.join(PARAMS)}")
        if self.closure not in CLOSURE or not isinstance(self.strict, bool):
            bad = ("_closure_", self.closure, "auto, true or false") if self.closure not in CLOSURE else (
                "_strict_", self.strict, "true or false")
            raise ValueError(f"{key}.{bad[0]}: {bad[1]!r} is not {bad[2]}")
        cls = self.optimizer_class()
        if not is_external(cls):
            raise ValueError(f"{key}._target_: {self.target} is not a torch.optim.Optimizer subclass")
        named, var_kw = arguments(cls), takes_var_kwargs(cls)
        for k in self.kwargs:
            if k not in named and (self.strict or not var_kw):
                opt_out = ("; _strict_: false passes it to its **kwargs" if var_kw else
                           "" if self.strict else "; _strict_: false, but it has no **kwargs")
                raise ValueError(f"{key}.{k}: {self.target} takes no argument {k!r}{_did_you_mean(k, list(named))} "
                                 f"(it takes: {', '.join(named)}{opt_out})")
        for k, p in named.items():
            if p.default is inspect.Parameter.empty and k not in self.kwargs:
                raise ValueError(f"{key}.{k}: required by {self.target} (no default); set it in the YAML")
        bad = non_finite(self.kwargs, key)
        if bad:
            raise ValueError(f"{bad[0]}: must be a finite number (got {bad[1]})")
        closure = step_requires_closure(cls)
        if self.closure is True and closure is None:
            raise ValueError(f"{key}._closure_: {self.target}.step takes no closure")
        if self.closure is False and closure:
            raise ValueError(f"{key}._closure_: {self.target}.step requires a closure (use auto or true)")
        dummy = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
        try:
            cls(self._groups({"hidden": dummy[:1], "gain_bias": dummy[1:]}, named), **self.kwargs)
        except Exception as e:  # noqa: BLE001 - a class refuses its arguments with any exception type
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise ValueError(f"{key}: {self.target} refuses these arguments ({type(e).__name__}: {first})") from None
        if self.aux is not None:
            self.aux.validate(f"{key}._aux_")

    def _groups(self, params: dict[str, list[torch.Tensor]], named: dict[str, inspect.Parameter]) -> list[dict]:
        """The param groups the class gets: the hidden matrices alone (_params_: hidden), or every non-empty
        split group, gains/biases without weight decay when the class takes weight_decay (else one group)."""
        if self.params == "hidden":
            return [{"params": params["hidden"], "group": "hidden"}]
        groups = [{"params": params[g], "group": g} for g in GROUPS if params.get(g)]
        if "weight_decay" not in named:
            return [{"params": [p for g in groups for p in g["params"]], "group": "all"}]
        return [{**g, "weight_decay": 0.0} if g["group"] == "gain_bias" else g for g in groups]

    def build(self, split: ParamSplit):
        cls = self.optimizer_class()
        groups = self._groups({g: split.params(g) for g in GROUPS}, arguments(cls))
        optimizer = ExternalOptimizer(cls(groups, **self.kwargs), self)
        return with_aux_adamw(optimizer, split, self.aux) if self.params == "hidden" else optimizer

    def resolved_kwargs(self) -> dict[str, Any]:
        """Every keyword argument the class runs with: its signature's defaults, then the YAML's values."""
        defaults = {k: p.default for k, p in arguments(self.optimizer_class()).items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.kwargs}

    def record(self) -> dict[str, Any]:
        """What summary.json and the banner say about the optimizer: the class's dotted path, its resolved
        keyword arguments, which parameters it steps, whether it takes a closure, and its package's version."""
        top = self.target.partition(".")[0]
        try:
            package = f"{top} {importlib.metadata.version(top.replace('_', '-'))}"
        except importlib.metadata.PackageNotFoundError:
            package = None  # a user's module, not an installed distribution
        return {"class": self.target, "kwargs": _recordable(self.resolved_kwargs()), "params": self.params,
                "closure": self.needs_closure(), "package": package}


class ExternalOptimizer:
    """An external optimizer as the training loop drives it: `inner` is the class's instance, whose param
    groups (the same dicts: the LR schedule writes them) and state are this one's. A class with train()/eval()
    modes starts in train mode; numpy's and Python's global generators are seeded from the run's seed. step(closure) passes the closure on only when the class needs one, counting its
    evaluations (`closure_evals`, kept in the state dict so a resumed run counts on). Other attributes are the
    class's (e.g. Schedule-Free's train(), eval())."""

    def __init__(self, inner: torch.optim.Optimizer, spec: ExternalSpec):
        self.inner, self.spec = inner, spec
        self.needs_closure = spec.needs_closure()
        self.closure_evals = 0
        if has_modes(inner):
            inner.train()
        # A class may draw from numpy's or Python's global generator (pytorch-optimizer's Kron balances its factors
        # when np.random.random() < balance_prob), which no one seeds: two runs of one seed would differ. Both are
        # seeded from the run's torch seed (set before the build); a checkpoint restores them on resume.
        seed = torch.initial_seed() % 2**32
        random.seed(seed)
        np.random.seed(seed)

    @property
    def name(self) -> str:
        return type(self.inner).__name__

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if not self.needs_closure:
            return self.inner.step()
        if closure is None:
            raise RuntimeError(f"{self.spec.target}.step needs a closure (optimizers/external.py step_closure)")

        def counted():
            self.closure_evals += 1
            return closure()

        return self.inner.step(counted)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.inner.state_dict(), "closure_evals": self.closure_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["optimizer"])
        self.closure_evals = int(state["closure_evals"])

    def __getattr__(self, name: str):
        # Only reached for attributes ExternalOptimizer lacks: the wrapped class's own (train, eval, ...).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return self.name


def members(optimizer) -> list:
    """The optimizers a run's optimizer steps: a CombinedOptimizer's members, or itself."""
    return list(getattr(optimizer, "optimizers", [optimizer]))


def externals(optimizer) -> list[ExternalOptimizer]:
    return [m for m in members(optimizer) if isinstance(m, ExternalOptimizer)]


def has_modes(optimizer) -> bool:
    """Whether `optimizer` has train()/eval() modes (Schedule-Free); torch's own optimizers have none."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def step_closure(optimizer, forward_backward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor] | None:
    """The closure train.py passes to `optimizer.step(closure)`, or None when no member needs one: it zeroes the
    gradients and re-runs `forward_backward` (the step's forward and backward on the same batch), gradients on,
    returning its loss. Its gradients are not clipped: a line search needs the gradient of the loss it measures."""
    if not any(getattr(m, "needs_closure", False) for m in members(optimizer)):
        return None

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return forward_backward()

    return closure


@contextlib.contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """The model's parameters as the optimizer evaluates them, for the duration: each member with train()/eval()
    modes (Schedule-Free: its average x instead of the gradient point y) is put in eval mode, then back in train
    mode with its parameters restored bit for bit (a round trip through eval() and train() would round them), so
    that evaluating never changes the training trajectory. A no-op for every other optimizer."""
    moded = [getattr(m, "inner", m) for m in members(optimizer) if has_modes(getattr(m, "inner", m))]
    with torch.no_grad():
        saved = [[p.detach().clone() for p in _params(m)] for m in moded]
        for m in moded:
            m.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, copies in zip(moded, saved):
                m.train()
                for p, y in zip(_params(m), copies):
                    p.copy_(y)


def _params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def closure_evals(optimizer) -> int:
    """Forward+backward evaluations made by closures so far (0 for optimizers that take none)."""
    return sum(m.closure_evals for m in externals(optimizer))


def record(optimizer) -> dict[str, Any] | None:
    """The external optimizer's record (ExternalSpec.record), or None for the project's own optimizers."""
    found = externals(optimizer)
    return found[0].spec.record() if found else None
