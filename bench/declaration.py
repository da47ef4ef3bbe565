"""A benchmark declaration (conf/bench/<name>.yaml), typed and checked before any run (docs/protocol.md v2).

A declaration fixes, before anything runs: the workload (an experiment plus overrides, the step budgets, the
shared hybrid group), every arm's search space (each knob with its default, range, grid step and source), the
search (method and trial count, equal for every arm), the tuning seed, the fresh seeds and the target rule.

    from bench.declaration import load_bench
    b = load_bench("tiny")            # conf/bench/tiny.yaml; BenchError (one line) for anything wrong
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config import search as configs
from harness.config.schema import ConfigError
from harness.config.validate import optimizer_keys
from optimizers.external import RESERVED

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = ("basic", "joblib", "slurm")
SEARCHES = ("coordinate", "qmc")
# keys a benchmark owns: an arm may not set or search them (the shared group is the workload's, not the arm's)
WORKLOAD_KEYS = ("train.", "data.", "model.vocab_size", "schedule.", "hybrid.", "optimizer.aux.", "seed")


class BenchError(ValueError):
    """A benchmark declaration or directory that must not be run; reported in one line, exit code 2."""


@dataclass
class Axis:
    """One tuned knob: searched between low and high (log or linear), the grid step used by coordinate descent
    and by the local-optimality certificate, and where the default and range come from."""

    default: float = MISSING
    low: float = MISSING
    high: float = MISSING
    step: float = MISSING  # log: the factor between grid points (> 1); linear: the difference (> 0)
    scale: str = "log"  # log | linear
    source: str = MISSING  # the paper, the authors' code, or an a-priori rule; never this workload's sweep

    def neighbours(self, value: float, level: int = 0) -> tuple[float | None, float | None]:
        """The grid points one step below and above `value` (None outside [low, high]). The grid is
        default x step^k (log) or default + k step (linear), k an integer, its step halved (in log) `level`
        times; each point is computed from k, never by repeated multiplication, so every path to a grid point
        gives the same value. An off-grid value (a quasi-random point) gets value / step and value x step."""
        log = self.scale == "log"
        step = self.step ** (0.5 ** level) if log else self.step * 0.5 ** level
        at = (lambda k: self.default * step ** k) if log else (lambda k: self.default + k * step)
        k = math.log(value / self.default) / math.log(step) if log else (value - self.default) / step
        if abs(k - round(k)) < 1e-3:
            down, up = at(round(k) - 1), at(round(k) + 1)
        else:
            down, up = (value / step, value * step) if log else (value - step, value + step)
        inside = (lambda v: self.low * (1 - 1e-4) <= v <= self.high * (1 + 1e-4))  # a 5-digit step: 1e-4
        return (round_value(down) if inside(down) else None, round_value(up) if inside(up) else None)

    def from_unit(self, u: float) -> float:
        """A point of [0, 1) mapped onto the range (log-uniform or uniform)."""
        if self.scale == "log":
            return round_value(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return round_value(self.low + u * (self.high - self.low))


@dataclass
class ArmConfig:
    optimizer: str = MISSING  # a conf/optimizer/<name>.yaml
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)  # fixed options of the arm (e.g. model.pc_level: 4)
    space: dict[str, Axis] = field(default_factory=dict)  # the tuned knobs (dotted keys), >= 2 for a main arm
    # A variant arm (e.g. Adam-mini on the whole model, outside the shared group) is reported apart, paired by
    # seed against the arm it varies; with inherit it takes that arm's chosen setting instead of a search.
    variant_of: str | None = None
    inherit: bool = False
    whole_model: bool = False  # the optimizer owns every parameter (no shared group): a variant's form


@dataclass
class SearchConfig:
    method: str = "coordinate"  # coordinate (Marin: one axis at a time, one grid step either way) | qmc (AlgoPerf)
    trials: int = 5  # the equal tuning budget of every arm, diverged trials included
    seed: int = 0  # the quasi-random sequence's scrambling seed (qmc), the same for every arm


@dataclass
class TargetConfig:
    loss: float | None = None  # declared a priori, or None: the reference's fresh-seed median at the full budget
    source: str = ""  # why this value (required with a declared loss)


@dataclass
class HybridDecl:
    """The shared group (optimizers/hybrid.py SharedGroup): declared values with their source, or chosen by the
    reference arm's own tuning (from_reference: the reference runs whole-model AdamW-style over every tensor
    first; its chosen lr and weight decay are frozen as the shared group of every other arm)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_groups: list[str] = field(default_factory=lambda: ["embedding", "head"])
    source: str = MISSING
    from_reference: bool = False


@dataclass
class BenchConfig:
    name: str = MISSING
    description: str = ""
    protocol: int = 2
    experiment: str = MISSING  # the workload: a conf/experiment/<name>.yaml ...
    overrides: list[str] = field(default_factory=list)  # ... plus these overrides, identical for every arm
    budgets: list[int] = MISSING  # step budgets (ascending, >= 3); the last is the full budget (tuning's)
    hybrid: HybridDecl = field(default_factory=HybridDecl)
    tune_hybrid_lr: bool = False  # ablation: every arm searches hybrid.lr too (all arms or none)
    search: SearchConfig = field(default_factory=SearchConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    reference: str = "adamw"  # the arm every speedup and paired difference is measured against
    muon_reference: str = "muon"
    muon_variants: list[str] = field(default_factory=list)  # also tested against muon_reference
    tuning_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])  # fresh seeds, paired across arms
    launcher: str = "basic"  # basic (in sequence) | joblib (parallel on this machine) | slurm (submitit)
    jobs: int = 1
    threads: int = 0  # torch threads per run (0 = torch's default); parallel CPU runs want cores / jobs
    logger: str = "wandb"  # conf/logger: wandb (offline without an API key) | none
    diagnostics: dict[str, Any] = field(default_factory=dict)  # a diag phase (harness/probes/diagnostics.py); {} = none
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    # every run's train.precision; None = the experiment's. auto on a CPU: measured once, before any run, on the
    # workload's model (harness/lifecycle/precision.py), kept in bench.json and passed to every run
    precision: str | None = None
    # resolved at load from the composed experiment (not declared): the schedule and whether budgets branch
    schedule: dict[str, Any] = field(default_factory=dict)
    precision_used: str | None = None  # resolved by bench/run.py: the train.precision every run gets

    @property
    def full_budget(self) -> int:
        return self.budgets[-1]

    @property
    def branches(self) -> bool:
        """WSD: the smaller budgets are cooldown branches of the full-budget seed runs."""
        return self.schedule.get("name") == "wsd"

    def main_arms(self) -> list[str]:
        return [a for a, arm in self.arms.items() if arm.variant_of is None]

    def space(self, arm: str) -> dict[str, Axis]:
        """The arm's tuned axes, with the shared lr added in the tune_hybrid_lr ablation."""
        a = self.arms[arm]
        if a.inherit:
            return {}
        axes = dict(a.space)
        if self.tune_hybrid_lr and not a.whole_model:
            h = self.hybrid.lr
            axes["hybrid.lr"] = Axis(default=h, low=h / 10, high=h * 10, step=math.sqrt(10), scale="log",
                                     source="ablation: the declared shared lr, one decade either way")
        return axes


def round_value(v: float) -> float:
    """Grid values at 4 significant digits: readable trial ids, and the same point reached by two paths is one."""
    return float(f"{v:.4g}")


def seed_pair(seed: int) -> tuple[int, int]:
    """(init seed, data-order seed) of benchmark seed `seed`: two independent draws (numpy SeedSequence), the same
    in every arm, so seed s pairs identical initial weights and data order across arms."""
    init, data = np.random.SeedSequence(seed).generate_state(2)
    return int(init % 2**31), int(data % 2**31)


def load_bench(name_or_path: str, **cli: Any) -> BenchConfig:
    """A declaration by name (conf/bench/<name>.yaml, or bench/<name>.yaml of a directory of
    OPTBENCH_CONFIG_PATH, harness/config/search.py) or by path."""
    try:
        configs.activate()  # a wrong OPTBENCH_CONFIG_PATH is one line; the multirun inherits it, absolute
    except ConfigError as e:
        raise BenchError(str(e)) from None
    path = Path(name_or_path)
    if not path.suffix:
        path = configs.find("bench", name_or_path) or REPO / "conf" / "bench" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BenchError(f"bench: no {path} (known: {', '.join(configs.options('bench'))})")
    try:
        node = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.load(path),
                               {k: v for k, v in cli.items() if v is not None})
        bench = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise BenchError(f"bench.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]} ({path})") from None
    validate(bench)
    bench.schedule = composed_schedule(bench)
    return bench


def composed(b: BenchConfig, *extra: str):
    """The workload's config as Hydra composes it (experiment + overrides + `extra`)."""
    from harness.config.schema import register_configs

    register_configs()
    overrides = configs.with_user_dirs([f"experiment={b.experiment}", *b.overrides, "logger=none", *extra])
    try:
        with initialize_config_dir(config_dir=str(configs.CONF), version_base="1.3", job_name="bench"):
            return compose("config", overrides=overrides)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types; the first line names the problem
        raise BenchError(f"bench.overrides: the workload does not compose ({str(e).splitlines()[0]})") from None


def composed_schedule(b: BenchConfig) -> dict[str, Any]:
    """The workload's schedule as Hydra composes it (experiment + overrides)."""
    cfg = composed(b)
    sched = OmegaConf.to_container(cfg.schedule, resolve=True)
    if sched.get("name") == "wsd" and sched.get("warmup_steps") is None and sched.get("warmup_frac", 0):
        raise BenchError("bench.overrides: a WSD workload branches its budgets from one run, so its warmup must be "
                         "in steps: set schedule.warmup_steps (a fraction of each budget would differ)")
    return sched


def _fail(key: str, why: str) -> None:
    raise BenchError(f"bench.{key}: {why}")


def validate(b: BenchConfig) -> None:
    """Everything protocol v2 requires of a declaration, each failure one line naming the key."""
    if b.protocol != 2:
        _fail("protocol", f"this harness runs protocol version 2 (got {b.protocol})")
    if b.launcher not in LAUNCHERS:
        _fail("launcher", f"{b.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if b.jobs < 1 or b.threads < 0:
        _fail("jobs", "must be >= 1 (and bench.threads >= 0)")
    if b.precision not in (None, "auto", "fp32", "bf16"):
        _fail("precision", f"{b.precision!r} is not auto, fp32 or bf16")
    if b.search.method not in SEARCHES:
        _fail("search.method", f"{b.search.method!r} is not one of {', '.join(SEARCHES)}")
    if b.search.trials < 2:
        _fail("search.trials", f"need >= 2 trials per arm (got {b.search.trials})")
    if len(b.budgets) < 3 or sorted(set(b.budgets)) != list(b.budgets) or b.budgets[0] < 1:
        _fail("budgets", f"need >= 3 distinct ascending positive step budgets (got {list(b.budgets)})")
    if len(b.seeds) < 3 or b.tuning_seed in b.seeds or len(set(b.seeds)) != len(b.seeds):
        _fail("seeds", f"need >= 3 distinct fresh seeds other than the tuning seed {b.tuning_seed} (got {b.seeds})")
    if b.target.loss is not None and not b.target.source:
        _fail("target.source", "a declared target needs its source (declared before any run: say why this value)")
    if configs.find("experiment", b.experiment) is None:
        _fail("experiment", f"no {configs.where('experiment', b.experiment)}")
    for o in b.overrides:
        if o.split("=", 1)[0].lstrip("+~").startswith(("optimizer", "hybrid")):
            _fail("overrides", f"{o!r}: the optimizer is the arm's and the shared group is bench.hybrid")
    if "hidden" in b.hybrid.decay_groups:
        _fail("hybrid.decay_groups", "the shared group does not own the hidden matrices")
    _check_diagnostics(b)
    refs = [b.reference, *([b.muon_reference] if b.muon_variants else []), *b.muon_variants]
    for ref in refs:
        if ref not in b.arms or b.arms[ref].variant_of:
            _fail("arms", f"the reference/compared arm {ref!r} is not a declared main arm")
    for name, a in b.arms.items():
        _check_arm(b, name, a)


def _check_diagnostics(b: BenchConfig) -> None:
    if not b.diagnostics:
        return
    from harness.probes.diagnostics import DiagnosticsConfig

    try:
        diag = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiagnosticsConfig), b.diagnostics))
        diag.validate()
    except (OmegaConfBaseException, ValueError) as e:
        key = getattr(e, "full_key", None)
        _fail(f"diagnostics{'.' + key if key else ''}", str(e).splitlines()[0])
    if not diag.every:
        _fail("diagnostics.every", "must be > 0 for a diag phase (or leave bench.diagnostics empty)")


def _check_arm(b: BenchConfig, name: str, a: ArmConfig) -> None:
    key = f"arms.{name}"
    if configs.find("optimizer", a.optimizer) is None:
        _fail(f"{key}.optimizer", f"no {configs.where('optimizer', a.optimizer)}")
    for k in (*a.set, *a.space):
        variant_hybrid = a.variant_of is not None and k.startswith("hybrid.") and k in a.set
        if k.startswith(WORKLOAD_KEYS) and not variant_hybrid:
            _fail(f"{key}", f"{k!r} belongs to the workload (identical for every main arm), not to an arm"
                  + ("; a variant arm (variant_of) may set the shared group" if k.startswith("hybrid.") else ""))
    if a.variant_of is not None:
        if a.variant_of not in b.arms or b.arms[a.variant_of].variant_of is not None:
            _fail(f"{key}.variant_of", f"{a.variant_of!r} is not a main arm")
        if a.inherit and a.space:
            _fail(f"{key}.space", "an inheriting variant takes its main arm's chosen setting; declare no space")
        if a.inherit and b.arms[a.variant_of].optimizer != a.optimizer:
            _fail(f"{key}.inherit", "inherits the setting of an arm with another optimizer")
    elif a.inherit or a.whole_model:
        _fail(f"{key}", "inherit and whole_model are for variant arms (variant_of)")
    _check_knobs(name, a)
    if a.inherit:
        return
    if len(a.space) < 2:
        _fail(f"{key}.space", f"need >= 2 tuned knobs (learning rate and weight decay at least), got {list(a.space)}")
    for k, ax in a.space.items():
        where = f"{key}.space.{k}"
        if ax.scale not in ("log", "linear"):
            _fail(f"{where}.scale", f"{ax.scale!r} is not log or linear")
        if not ax.source.strip():
            _fail(f"{where}.source", "every default and range needs its source")
        if not ax.low <= ax.default <= ax.high or (ax.scale == "log" and ax.low <= 0):
            _fail(where, f"need 0 < low <= default <= high on a log axis (got {ax.low}, {ax.default}, {ax.high})"
                  if ax.scale == "log" else f"need low <= default <= high (got {ax.low}, {ax.default}, {ax.high})")
        if not (ax.step > 1 if ax.scale == "log" else ax.step > 0):
            _fail(f"{where}.step", f"must be {'> 1 (a factor)' if ax.scale == 'log' else '> 0'} (got {ax.step})")


def _check_knobs(name: str, a: ArmConfig) -> None:
    """Every `optimizer.<key>` an arm sets or tunes is a key its optimizer takes (harness/config/validate.py
    optimizer_keys: a spec's fields, or an external torch optimizer's keyword arguments), so that a typo fails
    here rather than at the first trial. An external optimizer's reserved keys (`_params_`, ...) are options an
    arm may set, never tuned knobs; its `_aux_` is the workload's (the shared group replaces it)."""
    path = configs.find("optimizer", a.optimizer)
    target = OmegaConf.load(path).get("_target_") if path is not None else None
    if not target:  # no file: refused by the caller; no _target_: refused by the run's own checks
        return
    try:
        spec_cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - hydra wraps import errors in several types
        _fail(f"arms.{name}.optimizer", f"{a.optimizer}: cannot import {target!r} ({e.__class__.__name__})")
    for where, keys in (("set", a.set), ("space", a.space)):
        for k in (k for k in keys if k.startswith("optimizer.")):
            parent, _, leaf = k.removeprefix("optimizer.").rpartition(".")
            if k.startswith("optimizer._aux_."):
                _fail(f"arms.{name}.{where}", f"{k!r} belongs to the workload (the shared group), not to an arm")
            if where == "space" and leaf in RESERVED:
                _fail(f"arms.{name}.space.{k}", f"{leaf} is an option of the arm (set it), not a tuned knob")
            known = optimizer_keys(spec_cls, parent)
            if leaf not in known:
                close = difflib.get_close_matches(leaf, known, n=1)
                hint = f" (did you mean optimizer.{parent + '.' if parent else ''}{close[0]}?)" if close else ""
                _fail(f"arms.{name}.{where}.{k}", f"optimizer={a.optimizer} ({target}) takes no key {leaf!r}{hint}")


def declaration(b: BenchConfig) -> dict[str, Any]:
    """The resolved declaration as bench.json stores it."""
    d = asdict(b)
    d["arms"] = {name: {**asdict(a), "space": {k: asdict(ax) for k, ax in b.space(name).items()}}
                 for name, a in b.arms.items()}
    return d


def workload_fields(b: BenchConfig) -> dict[str, Any]:
    """What makes two benchmark directories comparable: refused when any of these differ."""
    return {"experiment": b.experiment, "overrides": list(b.overrides), "budgets": list(b.budgets),
            "hybrid": asdict(b.hybrid), "tune_hybrid_lr": b.tune_hybrid_lr, "search": asdict(b.search),
            "tuning_seed": b.tuning_seed, **({"precision": b.precision} if b.precision else {})}
