"""Read a benchmark's run records (and nothing else): the shared input of scripts/bench.py and the reports.

A benchmark directory (scripts/bench.py writes it) looks like

    results/<bench>/bench.json                       the resolved declaration (arms, grids, seeds, target rule)
    results/<bench>/runs/tune/<arm>/<trial>/          one tuning trial (seed = tuning seed)
    results/<bench>/runs/seed/<arm>/<trial>/          the chosen setting re-run with another seed

and every run directory holds train.py's records (config.yaml, env.json, metrics.jsonl, summary.json).

    python -c "from scripts.bench_records import load_runs; print(len(load_runs('results/bench_tiny')))"
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class RecordError(ValueError):
    """Records that cannot be compared (mixed workloads) or a benchmark directory that is not one."""


@dataclass
class RunRecord:
    dir: Path
    arm: str
    phase: str  # tune | seed | diag
    trial: str
    seed: int
    data_seed: int
    setting: dict[str, Any]  # swept axis (dotted config key) -> value, read from config.yaml
    summary: dict[str, Any]
    evals: list[dict[str, Any]]  # metrics.jsonl evaluation records: step, tokens, train_time_s, val_loss
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged")) or not _finite(self.summary.get("final_val_loss"))

    @property
    def final_loss(self) -> float:
        """Final validation loss; +inf for a diverged run (it ranks last, protocol.md rule 6)."""
        return math.inf if self.diverged else float(self.summary["final_val_loss"])

    @property
    def workload_hash(self) -> str:
        return self.summary["workload_hash"]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def read_bench(bench_dir: Path | str) -> dict[str, Any]:
    path = Path(bench_dir) / "bench.json"
    if not path.is_file():
        raise RecordError(f"{bench_dir} is not a benchmark directory (no bench.json; scripts/bench.py writes it)")
    return json.loads(path.read_text())


def first_reach(evals: list[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    """The first evaluation record with a finite val loss <= target (protocol: no interpolation), or None."""
    if target is None:
        return None
    return next((e for e in evals if _finite(e["val_loss"]) and e["val_loss"] <= target), None)


def load_run(run_dir: Path, axes: list[str]) -> RunRecord | None:
    """The run's record, or None when it is incomplete (no summary.json yet: still running or killed)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    config = OmegaConf.load(run_dir / "config.yaml")
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    env_path = run_dir / "env.json"
    return RunRecord(
        dir=run_dir, arm=config.bench.arm, phase=config.bench.phase, trial=config.bench.trial,
        seed=config.seed, data_seed=config.data.seed,
        setting={a: OmegaConf.select(config, a) for a in axes}, summary=summary,
        evals=[{k: r.get(k) for k in ("step", "tokens", "train_time_s", "val_loss")} for r in evals],
        env=json.loads(env_path.read_text()) if env_path.is_file() else {})


def load_runs(bench_dir: Path | str, check_workload: bool = True,
              phases: tuple[str, ...] = ("tune", "seed")) -> list[RunRecord]:
    """Every complete run of the benchmark's phases (tune and seed: the statistics; diag: the diagnostics
    re-runs), in (phase, arm, trial) order. Refuses (RecordError) when the runs do not share one workload hash:
    results of different workloads are never compared."""
    bench_dir = Path(bench_dir)
    bench = read_bench(bench_dir)
    runs = []
    for phase in phases:
        for arm, decl in bench["arms"].items():
            root = bench_dir / "runs" / phase / arm
            for run_dir in sorted(p for p in root.glob("*") if p.is_dir() and ".broken-" not in p.name):
                run = load_run(run_dir, list(decl["grid"]))
                if run is not None:
                    runs.append(run)
    hashes = sorted({r.workload_hash for r in runs})
    if check_workload and len(hashes) > 1:
        raise RecordError(f"{bench_dir}: runs of {len(hashes)} workloads ("
                          + ", ".join(f"{h[:12]}: {sum(r.workload_hash == h for r in runs)} runs" for h in hashes)
                          + "); results of different workloads are never compared")
    return runs


def choose_best(tune_runs: list[RunRecord], target: float | None = None) -> RunRecord | None:
    """protocol.md rule 2: the lowest final validation loss (diverged runs rank last), ties broken by steps
    to target (unreached = inf), then by trial id for a deterministic choice. None if there are no runs or
    every run diverged."""
    def key(r: RunRecord):
        hit = first_reach(r.evals, target)
        return (r.final_loss, hit["step"] if hit else math.inf, r.trial)

    ranked = sorted(tune_runs, key=key)
    return ranked[0] if ranked and not ranked[0].diverged else None
