"""A benchmark end to end (docs/protocol.md v2): search every arm at an equal budget, certify the choices, re-run
them on fresh paired seeds at every budget, then build the report. `scripts/bench.py` is its command line.

Every step is recomputed from the declaration and the records on disk, so a benchmark that is re-launched
(after a kill, or with more seeds) runs only what is missing; a directory of another workload is refused.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.declaration import BenchConfig, BenchError, composed, declaration, workload_fields
from bench.launch import launch
from bench.plan import PlannedRun, branch_runs, recorded_loss, seed_runs
from bench.search import certificate_points, coordinate_rounds, qmc_points, setting_id
from runtime.files import atomic_write_json

TIED = ("lr", "weight_decay")  # the reference's own knobs that become the shared group's (hybrid.from_reference)


def open_bench_dir(b: BenchConfig, out: Path) -> dict[str, Any]:
    """bench.json of the benchmark directory: created, or checked against the declaration. A directory of
    another workload or search protocol, or with an arm declared differently, is refused, never mixed."""
    decl = declaration(b)
    decl["workload"] = workload_fields(b)
    decl["arm_order"] = list(b.arms)
    path = out / "bench.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("protocol") != 2:
            raise BenchError(f"{out} holds a protocol v{old.get('protocol', 1)} benchmark; use --out for v2")
        for key, value in decl["workload"].items():
            if old["workload"].get(key) != value:
                raise BenchError(f"{out} holds benchmark results with {key}={old['workload'].get(key)!r}, this "
                                 f"declaration has {value!r}: results of different workloads are never mixed; "
                                 "use --out")
        for arm, a in decl["arms"].items():
            prev = old["arms"].get(arm)
            if prev and any(prev[k] != a[k] for k in ("space", "set", "optimizer", "variant_of", "whole_model")):
                raise BenchError(f"{out}: arm {arm!r} was run with another declaration; use --out")
        decl["created"] = old.get("created")
        if "precision_probe" in old:  # measured once: a resumed benchmark never re-measures
            decl["precision_probe"] = old["precision_probe"]
    out.mkdir(parents=True, exist_ok=True)
    decl.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    decl["command"] = " ".join(sys.argv)
    return decl


def bench_precision(b: BenchConfig, decl: dict[str, Any]) -> str | None:
    """The train.precision every run of the benchmark gets. `auto` (declared, or the experiment's) on a CPU
    launcher: measured here once on the workload's model (harness/lifecycle/precision.py), recorded in
    bench.json as `precision_probe` and reused by every later launch of this directory. SLURM runs resolve
    `auto` on their own GPU (bf16 autocast where supported)."""
    import torch
    from omegaconf import OmegaConf

    from harness.lifecycle import precision
    from models import ModelConfig

    if "precision_probe" in decl:
        return decl["precision_probe"]["choice"]
    cfg = composed(b, *([f"train.precision={b.precision}"] if b.precision else []))
    t = cfg.train
    if t.precision != "auto" or b.launcher == "slurm" or torch.cuda.is_available():
        return None if t.precision == "auto" else t.precision
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg.model))
    threads = torch.get_num_threads()
    torch.set_num_threads(b.threads or threads)  # the runs' own thread count
    try:
        probe = precision.probe(model, int(t.micro_batch_size), int(t.seq_len), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    decl["precision_probe"] = {**probe, "threads": b.threads or threads}
    r = probe["tokens_per_s"]
    print(f"precision auto: {probe['choice']} (fp32 {r['fp32']:,.0f}, bf16 {r['bf16']:,.0f} tokens/s forward+backward; "
          f"bf16 needs {probe['margin']}x)", flush=True)
    return probe["choice"]


def _tune_run(b: BenchConfig, arm: str, setting: dict[str, Any], tie: bool) -> PlannedRun:
    extra = {f"hybrid.{k}": setting[f"optimizer.{k}"] for k in TIED if f"optimizer.{k}" in setting} if tie else {}
    return PlannedRun(arm, "tune", setting_id(setting), {**setting, **extra}, b.tuning_seed, b.full_budget)


def tune(b: BenchConfig, out: Path, arms: list[str], hybrid: dict[str, Any], dry_run: bool) -> None:
    """The search of every arm in `arms`, all arms' next round launched together; rounds until done."""
    tie = b.hybrid.from_reference and arms == [b.reference]
    for round_no in range(10_000):
        pending: list[PlannedRun] = []
        for arm in arms:
            space = b.space(arm)
            if b.search.method == "qmc":
                settings = qmc_points(space, b.search.trials, b.search.seed)
            else:
                rounds, done = coordinate_rounds(
                    space, b.search.trials, lambda s, arm=arm: recorded_loss(out, _tune_run(b, arm, s, tie)))
                settings = [] if done else rounds[-1]
            pending += [r for s in settings if recorded_loss(out, r := _tune_run(b, arm, s, tie)) is None]
        if not pending:
            return
        launch(b, out, f"tune round {round_no}" + (" (reference first)" if tie else ""), pending, hybrid, dry_run)
        if dry_run:
            if b.search.method == "coordinate":
                print("  (coordinate descent: the next rounds depend on these results)")
            return


def tune_trials(b: BenchConfig, out: Path, arm: str) -> list[tuple[dict[str, Any], float | None]]:
    """The arm's search trials and their recorded final losses (None: not run)."""
    space = b.space(arm)
    tie = b.hybrid.from_reference and arm == b.reference
    if b.search.method == "qmc":
        settings = qmc_points(space, b.search.trials, b.search.seed)
    else:
        settings = [s for r in coordinate_rounds(space, b.search.trials,
                                                 lambda s: recorded_loss(out, _tune_run(b, arm, s, tie)))[0] for s in r]
    return [(s, recorded_loss(out, _tune_run(b, arm, s, tie))) for s in settings]


def choose(b: BenchConfig, out: Path, arm: str) -> dict[str, Any] | None:
    """docs/protocol.md rule 3: the best trial by end-of-schedule loss at the full budget on the tuning seed (diverged
    trials rank last; ties by trial id). None when every trial diverged or is missing."""
    scored = [(loss, setting_id(s), s) for s, loss in tune_trials(b, out, arm) if loss is not None
              and math.isfinite(loss)]
    if not scored:
        return None
    loss, trial, setting = min(scored, key=lambda t: (t[0], t[1]))
    return {"trial": trial, "setting": setting, "final_val_loss": loss}


def certificate_runs(b: BenchConfig, out: Path, arm: str, chosen: dict[str, Any]) -> list[PlannedRun]:
    """The chosen setting's neighbours the search did not run (outside the budget); the reference's, under
    hybrid.from_reference, with the shared group tied to its knobs as in its search."""
    searched = {setting_id(s) for s, _ in tune_trials(b, out, arm)}
    tie = b.hybrid.from_reference and arm == b.reference
    return [PlannedRun(arm, "cert", r.trial, r.setting, b.tuning_seed, b.full_budget)
            for _, _, s in certificate_points(b.space(arm), chosen["setting"])
            if s is not None and setting_id(s) not in searched for r in [_tune_run(b, arm, s, tie)]]


def run_benchmark(b: BenchConfig, out: Path, dry_run: bool = False) -> dict[str, Any]:
    decl = open_bench_dir(b, out) if not dry_run else declaration(b)
    hybrid = {k: v for k, v in asdict(b.hybrid).items() if k not in ("source", "from_reference")}
    save = (lambda: None) if dry_run else (lambda: atomic_write_json(out / "bench.json", decl))
    if not dry_run:
        b.precision_used = bench_precision(b, decl)
    save()
    searched = [a for a in b.arms if not b.arms[a].inherit]
    if b.hybrid.from_reference:  # the reference's own tuning picks the shared group, frozen for every other arm
        tune(b, out, [b.reference], hybrid, dry_run)
        if dry_run:
            return decl
        ref = choose(b, out, b.reference)
        if ref is None:
            raise BenchError(f"the reference arm {b.reference!r}: every tuning trial diverged; no shared group")
        hybrid.update({k: ref["setting"][f"optimizer.{k}"] for k in TIED if f"optimizer.{k}" in ref["setting"]})
        decl["hybrid_chosen"] = {"by": b.reference, **hybrid}
        searched.remove(b.reference)
    tune(b, out, searched, hybrid, dry_run)
    if dry_run:
        return decl
    chosen: dict[str, Any] = {}
    for arm in b.arms:
        base = b.arms[arm].variant_of if b.arms[arm].inherit else arm
        c = chosen.get(base) or choose(b, out, base)
        if c is None:
            print(f"  {arm:<14} every trial diverged or is missing: no seed runs", flush=True)
            continue
        chosen[arm] = {**c, "inherited_from": base} if base != arm else c
        print(f"  {arm:<14} {'inherits' if base != arm else 'chose'} {c['trial']} (tuning-seed loss "
              f"{c['final_val_loss']:.4f})", flush=True)
    decl["chosen"], decl["hybrid_used"] = chosen, hybrid
    save()
    certified = [a for a in b.arms if not b.arms[a].inherit]  # the reference too under hybrid.from_reference
    cert = [r for arm in certified if arm in chosen for r in certificate_runs(b, out, arm, chosen[arm])]
    launch(b, out, "cert (outside the budget)", cert, hybrid)
    launch(b, out, "seed", [r for arm, c in chosen.items() for r in seed_runs(b, arm, c["setting"])], hybrid)
    launch(b, out, "branch", [r for arm, c in chosen.items() for r in branch_runs(b, arm, c["setting"])], hybrid)
    if b.diagnostics:  # untimed re-runs with diagnostics on, after the timed ones
        launch(b, out, "diag", [r for arm, c in chosen.items() for r in seed_runs(b, arm, c["setting"], True)],
               hybrid)
    return decl
