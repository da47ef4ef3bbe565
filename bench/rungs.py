"""A scaling ladder's declaration, checked before any run, and its directory (protocol.md v2, "Scaling ladder"): one benchmark protocol at >= 3 model sizes spanning
>= 8x in non-embedding parameters at a fixed tokens per parameter, then (bench/ladder.py) the fit of each arm's speedup over the
reference against size (bench/ladder.py: summary.json, report.md, plots/speedup_vs_size.png).

    python scripts/ladder.py cpu --dry-run      # conf/ladder/cpu.yaml: each rung's N, budgets, cost, first runs
    python scripts/ladder.py cpu --launcher joblib --jobs 2 --threads 1      -> results/ladder_cpu/<rung>/
    python scripts/ladder.py gpu --launcher slurm                           # conf/ladder/gpu.yaml, FineWeb

A declaration (conf/ladder/<name>.yaml) names a base benchmark (conf/bench/<base>.yaml: its search, seeds,
shared group, schedule and arms' spaces), a subset of its arms, tokens_per_param, warmup_frac and the rungs,
each either `set` (model.* keys: a size, run in <out>/<rung>/) or `bench` (a declared benchmark used as it
stands, in its own directory results/bench_<name>/: its runs are shared, not re-run). With N Kaplan's
non-embedding count of the composed model (the total minus the token and position embeddings, a tied head
counted once in them, as bench/analysis.py workload_info counts it) and T its tokens per step:
B = round(tokens_per_param N / T), budgets [round(B/4), round(B/2), B], schedule.warmup_steps =
round(warmup_frac B) (Python's round: halves to even). A declared target loss belongs to the base's model, so
a `set` rung takes the reference-median target rule.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.declaration import (
    REPO,
    BenchConfig,
    BenchError,
    TargetConfig,
    composed,
    load_bench,
    validate,
)
from bench.ladder import LADDER_FILE, MIN_RUNGS, MIN_SPAN
from bench.plan import cooldown_start
from harness.config import search as configs

SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # a rung is a directory


@dataclass
class RungDecl:
    name: str = MISSING  # the rung's directory under the ladder's
    set: dict[str, Any] = field(default_factory=dict)  # model.* keys: this size (budgets derived)
    bench: str | None = None  # or: this declared benchmark as it stands (its budgets must be the rule's)


@dataclass
class LadderDecl:
    name: str = MISSING
    description: str = ""
    base: str = MISSING  # a conf/bench/<name>.yaml (or a path): every rung runs its protocol
    arms: list[str] = MISSING  # a subset of base's arms, its reference and Muon reference included
    tokens_per_param: float = MISSING  # tokens at the full budget per non-embedding parameter
    warmup_frac: float = MISSING  # schedule.warmup_steps = round(warmup_frac x full budget), per rung
    rungs: list[RungDecl] = MISSING


@dataclass
class Rung:
    name: str
    bench: BenchConfig
    dir: Path
    shared: bool  # a declared benchmark's own directory (its runs are its benchmark's)
    size: dict[str, Any]  # model_size()

    @property
    def n(self) -> int:
        return int(self.size["non_embedding_params"])

    @property
    def tokens(self) -> int:
        return self.bench.full_budget * int(self.size["tokens_per_step"])


@dataclass
class Ladder:
    decl: LadderDecl
    base: BenchConfig  # the base declaration restricted to the ladder's arms
    rungs: list[Rung]
    dir: Path


def derived_budgets(tokens_per_param: float, n: int, tokens_per_step: int) -> list[int]:
    """[round(B/4), round(B/2), B] with B = round(tokens_per_param n / tokens_per_step)."""
    full = round(tokens_per_param * n / tokens_per_step)
    return [round(full / 4), round(full / 2), full]


def model_size(cfg) -> dict[str, Any]:
    """The composed config's model built on the meta device (no memory, no compute): n_params, Kaplan's
    non_embedding_params (exactly as bench/analysis.py workload_info), tokens_per_step, flops_per_token."""
    import torch

    from models import ROLE_GROUP, build_model
    from models.config import ModelConfig
    from optimizers.groups import split_parameters

    mcfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    with torch.device("meta"):
        model = build_model(mcfg)
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    total = model.num_params()
    return {"n_params": total, "non_embedding_params": total - split.counts()["embedding"][1],
            "tokens_per_step": int(cfg.train.seq_len) * int(cfg.train.global_batch_size),
            "flops_per_token": model.flops_per_token(int(cfg.train.seq_len)), "data": str(cfg.data.name)}


def _size(b: BenchConfig, where: str) -> tuple[dict[str, Any], Any]:
    """model_size() of the benchmark's composed workload, and that config."""
    try:
        cfg = composed(b)
        return model_size(cfg), cfg
    except ValueError as e:  # BenchError (the workload does not compose) or the model's own check
        raise BenchError(f"{where}: {str(e).splitlines()[0]}") from None


def _known(node: dict, cls: type, where: str) -> None:
    names = [f.name for f in fields(cls)]
    for k in node:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            raise BenchError(f"{where}{k}: unknown key" + (f" (did you mean {where}{close[0]}?)" if close else
                                                            f" (known: {', '.join(names)})"))


def _parse(path: Path) -> LadderDecl:
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict):
        raise BenchError(f"ladder: {path} is not a mapping of keys")
    _known(raw, LadderDecl, "ladder.")
    rungs = raw.get("rungs") or []
    if not isinstance(rungs, list) or len(rungs) < MIN_RUNGS:
        raise BenchError(f"ladder.rungs: need >= {MIN_RUNGS} rungs (model sizes), got {len(rungs)}")
    for i, r in enumerate(rungs):
        if not isinstance(r, dict):
            raise BenchError(f"ladder.rungs[{i}]: a rung is a mapping (name, set or bench)")
        _known(r, RungDecl, f"ladder.rungs.{r.get('name', i)}.")
    try:
        decl = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LadderDecl), raw))
    except OmegaConfBaseException as e:
        raise BenchError(f"ladder.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]} ({path})") from None
    names = [r.name for r in decl.rungs]
    for key, n in [("name", decl.name), *(("rungs", n) for n in names)]:
        if not SAFE_NAME.fullmatch(n) or names.count(n) > 1:
            raise BenchError(f"ladder.{key}: {n!r}: names are unique directory names ([A-Za-z0-9_.-]+)")
    if not decl.tokens_per_param > 0 or not 0 <= decl.warmup_frac < 1:
        raise BenchError("ladder.tokens_per_param: must be > 0 (and ladder.warmup_frac in [0, 1))")
    for r in decl.rungs:
        if r.bench and r.set:
            raise BenchError(f"ladder.rungs.{r.name}: either set (a size) or bench (a declared benchmark), "
                             "not both")
    return decl


def _check_arms(decl: LadderDecl, base: BenchConfig) -> None:
    for a in decl.arms:
        if a not in base.arms:
            close = difflib.get_close_matches(a, list(base.arms), n=1)
            raise BenchError(f"ladder.arms: {a!r} is not an arm of bench {base.name}"
                             + (f" (did you mean {close[0]}?)" if close else f" (arms: {', '.join(base.arms)})"))
        main = base.arms[a].variant_of
        if main and main not in decl.arms:
            raise BenchError(f"ladder.arms: {a!r} is a variant of {main!r}, which the ladder lacks")
    for role, a in (("reference", base.reference), ("Muon reference", base.muon_reference)):
        if a not in decl.arms:
            raise BenchError(f"ladder.arms: must include bench {base.name}'s {role} {a!r}")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _checked(b: BenchConfig, where: str, schedule: dict[str, Any]) -> BenchConfig:
    validate(b)
    b.schedule = schedule
    w = schedule.get("warmup_steps") or 0
    if b.branches and w >= cooldown_start(b.budgets[0], b.schedule["decay_frac"]):
        raise BenchError(f"{where}: warmup {w} steps reaches the cooldown of the smallest budget {b.budgets[0]}")
    return b


def _set_rung(decl: LadderDecl, base: BenchConfig, r: RungDecl, out: Path) -> Rung:
    where = f"ladder.rungs.{r.name}.set"
    for k in r.set:
        if not k.startswith("model.") or k == "model.vocab_size":
            raise BenchError(f"{where}: {k!r}: a rung sets model.* keys (its size), not the vocabulary (the "
                             "data's) or another part of the workload")
    kept = [o for o in base.overrides if _key(o) not in {"schedule.warmup_steps", *r.set}]
    sets = [f"{k}={json.dumps(v)}" for k, v in r.set.items()]
    size, cfg = _size(replace(base, overrides=kept + sets), where)
    budgets = derived_budgets(decl.tokens_per_param, size["non_embedding_params"], size["tokens_per_step"])
    warmup = round(decl.warmup_frac * budgets[-1])
    # a declared target loss belongs to the base's model size; another size takes the reference-median rule
    n, total = size["non_embedding_params"], size["n_params"]
    # its own title: the base's description names the base's model size and budgets, not this rung's
    title = (f"rung {r.name} of ladder {decl.name}: the {base.name} benchmark's workload with {' '.join(sets)} "
             f"({total:,} params, {n / total:.0%} non-embedding), budgets {'/'.join(map(str, budgets))} steps x "
             f"{size['tokens_per_step']:,} tokens")
    b = replace(base, name=f"ladder_{decl.name}_{r.name}", budgets=budgets, description=title,
                overrides=[*kept, f"schedule.warmup_steps={warmup}", *sets],
                target=base.target if not r.set else TargetConfig())
    # the schedule composed_schedule() would give: the same overrides but the warmup, set here in steps
    schedule = {**OmegaConf.to_container(cfg.schedule, resolve=True), "warmup_steps": warmup}
    return Rung(r.name, _checked(b, where, schedule), out / r.name, False, size)


def _shared_rung(decl: LadderDecl, full: BenchConfig, r: RungDecl, cli: dict) -> Rung:
    where = f"ladder.rungs.{r.name}.bench"
    b = full if r.bench == decl.base else load_bench(r.bench, **cli)
    missing = [a for a in decl.arms if a not in b.arms]
    if missing:
        raise BenchError(f"{where}: bench {b.name} lacks the ladder's arms {missing}")
    for key in ("search", "seeds", "tuning_seed", "hybrid", "tune_hybrid_lr", "reference", "muon_reference"):
        if getattr(b, key) != getattr(full, key):
            raise BenchError(f"{where}: bench {b.name}'s {key} differs from the base {full.name}'s (one protocol)")
    for a in decl.arms:
        if b.arms[a] != full.arms[a]:
            raise BenchError(f"{where}: bench {b.name} declares arm {a!r} otherwise than the base {full.name}")
    size, _ = _size(b, where)
    want = derived_budgets(decl.tokens_per_param, size["non_embedding_params"], size["tokens_per_step"])
    if list(b.budgets) != want:
        raise BenchError(f"{where}: bench {b.name}'s budgets {list(b.budgets)} are not the ladder's {want} "
                         f"(N = {size['non_embedding_params']:,}, {size['tokens_per_step']:,} tokens/step, "
                         f"{decl.tokens_per_param:g} tokens per parameter)")
    warmup = round(decl.warmup_frac * want[-1])
    if (b.schedule.get("warmup_steps") or 0) != warmup:
        raise BenchError(f"{where}: bench {b.name}'s schedule.warmup_steps {b.schedule.get('warmup_steps')} is "
                         f"not the ladder's round({decl.warmup_frac:g} x {want[-1]}) = {warmup}")
    return Rung(r.name, b, REPO / "results" / f"bench_{b.name}", True, size)


def _path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = configs.find("ladder", name_or_path) or REPO / "conf" / "ladder" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise BenchError(f"ladder: no {path} (known: {', '.join(configs.options('ladder'))})")
    return path


def load_ladder(name_or_path: str, out: Path | str | None = None, **cli: Any) -> Ladder:
    """A ladder declaration (conf/ladder/<name>.yaml or a path) with every rung's benchmark built and checked
    (BenchError, one line, before any compute); `cli`: load_bench's overrides (launcher, jobs, ...)."""
    decl = _parse(_path(name_or_path))
    full = load_bench(decl.base, **cli)
    _check_arms(decl, full)
    base = replace(full, arms={a: full.arms[a] for a in decl.arms},
                   muon_variants=[v for v in full.muon_variants if v in decl.arms])
    lad_dir = Path(out) if out else REPO / "results" / f"ladder_{decl.name}"
    rungs = [_shared_rung(decl, full, r, cli) if r.bench else _set_rung(decl, base, r, lad_dir)
             for r in decl.rungs]
    if len({r.size["data"] for r in rungs}) > 1:
        data = sorted({r.size["data"] for r in rungs})
        raise BenchError(f"ladder.rungs: the rungs train on different data ({', '.join(data)})")
    ns = [r.n for r in rungs]
    if max(ns) < MIN_SPAN * min(ns):
        raise BenchError(f"ladder.rungs: the sizes span {max(ns) / min(ns):.1f}x in non-embedding parameters ("
                         + ", ".join(f"{r.name} {r.n:,}" for r in rungs) + f"); need >= {MIN_SPAN:g}x")
    return Ladder(decl, base, rungs, lad_dir)


def record(lad: Ladder) -> dict[str, Any]:
    """ladder.json: what the report reads besides the rungs' own records."""
    return {"protocol": 2, "name": lad.decl.name, "description": lad.decl.description, "base": lad.base.name,
            "declaration": asdict(lad.decl), "reference": lad.base.reference,
            "muon_reference": lad.base.muon_reference, "arms": list(lad.decl.arms),
            "tokens_per_param": lad.decl.tokens_per_param, "warmup_frac": lad.decl.warmup_frac,
            "rungs": [{"name": r.name, "dir": os.path.relpath(r.dir, lad.dir), "shared": r.shared,
                       "bench": r.bench.name, **r.size, "budgets": list(r.bench.budgets),
                       "overrides": list(r.bench.overrides)} for r in lad.rungs]}


def open_ladder_dir(lad: Ladder) -> None:
    """Write ladder.json, or check it: a directory holding another ladder's rungs is refused (use --out)."""
    from runtime.files import atomic_write_json

    path, new = lad.dir / LADDER_FILE, record(lad)
    if path.is_file():
        def workload(rec: dict) -> list:  # what each rung runs (not what this code computes about it)
            return [[r.get(k) for k in ("name", "dir", "bench", "budgets", "overrides")] for r in rec["rungs"]]

        old = json.loads(path.read_text())
        if workload(old) != workload(json.loads(json.dumps(new))):
            raise BenchError(f"{lad.dir} holds a ladder with other rungs; results of different ladders are never "
                             "mixed: use --out")
    lad.dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, new)


def plan_lines(lad: Ladder) -> list[str]:
    """The dry run's table: each rung's size, tokens, budgets and estimated relative cost (the FLOPs of one
    full-budget run, 6 N_matmul + attention per token, times the main arms it runs; the dearest rung = 1)."""
    cost = {r.name: r.size["flops_per_token"] * r.tokens * len(r.bench.main_arms()) for r in lad.rungs}
    top = max(cost.values())
    head = (f"  {'rung':<10} {'non-emb N':>11} {'params':>11} {'tokens':>13} {'tok/param':>9}  {'budgets':<20} "
            f"{'warmup':>6} {'FLOPs/run':>9} {'cost':>6}  directory")
    lines = [head]
    for r in lad.rungs:
        shared = " (shared: its own benchmark, all its arms)" if r.shared else ""
        lines.append(f"  {r.name:<10} {r.n:>11,} {r.size['n_params']:>11,} {r.tokens:>13,} {r.tokens / r.n:>9.1f}  "
                     f"{list(r.bench.budgets)!s:<20} {r.bench.schedule.get('warmup_steps') or 0:>6} "
                     f"{r.size['flops_per_token'] * r.tokens:>9.2e} {cost[r.name] / top:>6.3f}  "
                     f"{r.dir.relative_to(REPO) if r.dir.is_relative_to(REPO) else r.dir}{shared}")
    return lines
