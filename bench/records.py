"""Read a benchmark's run records (and nothing else): the input of the analysis and the report.

A benchmark directory (scripts/bench.py writes it) looks like

    results/<bench>/bench.json                       the resolved declaration, the choices, the shared group
    results/<bench>/runs/<phase>/<arm>/<trial>/       one run (bench/plan.py: tune, cert, seed, branch, diag)

and every run directory holds train.py's records (config.yaml, env.json, metrics.jsonl, summary.json).

    python -c "from bench.records import load_runs; print(len(load_runs('results/bench_tiny')))"
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
    phase: str  # tune | cert | seed | branch | diag
    trial: str
    seed: int  # the benchmark seed (s<seed> in the trial id; the tuning seed for tune / cert runs)
    init_seed: int
    data_seed: int
    budget: int  # train.max_steps: the end of this run's schedule
    setting: dict[str, Any]  # tuned axis (dotted config key) -> value, read from config.yaml
    summary: dict[str, Any]
    evals: list[dict[str, Any]]  # metrics.jsonl evaluation records: step, tokens, train_time_s, val_loss
    env: dict[str, Any] = field(default_factory=dict)
    hybrid: dict[str, Any] = field(default_factory=dict)  # the run's shared group (config.yaml `hybrid`)

    @property
    def diverged(self) -> bool:
        return bool(self.summary.get("diverged")) or not _finite(self.summary.get("final_val_loss"))

    @property
    def final_loss(self) -> float:
        """Final validation loss; +inf for a diverged run (it ranks last, docs/protocol.md rule 6)."""
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


def load_run(run_dir: Path, axes: list[str], tuning_seed: int = 0) -> RunRecord | None:
    """The run's record, or None when it is incomplete (no summary.json yet: still running or killed)."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        summary = json.loads(summary_path.read_text())
        config = OmegaConf.load(run_dir / "config.yaml")
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError) as e:
        raise RecordError(f"{run_dir}: unreadable records ({e})") from None
    env_path = run_dir / "env.json"
    trial = str(config.bench.trial)
    seed = int(trial[1:].split("_")[0]) if trial.startswith("s") and trial[1:].split("_")[0].isdigit() \
        else tuning_seed
    return RunRecord(
        dir=run_dir, arm=config.bench.arm, phase=config.bench.phase, trial=trial, seed=seed,
        init_seed=config.seed, data_seed=config.data.seed, budget=int(config.train.max_steps),
        setting={a: OmegaConf.select(config, a) for a in axes}, summary=summary,
        evals=[{k: r.get(k) for k in ("step", "tokens", "train_time_s", "val_loss")} for r in lines
               if "val_loss" in r],
        env=json.loads(env_path.read_text()) if env_path.is_file() else {},
        hybrid=OmegaConf.to_container(config.hybrid) if "hybrid" in config else {})


def load_runs(bench_dir: Path | str, phases: tuple[str, ...] = ("tune", "cert", "seed", "branch")) -> list[RunRecord]:
    """Every complete run of the benchmark's phases, in (phase, arm, trial) order."""
    bench_dir = Path(bench_dir)
    bench = read_bench(bench_dir)
    runs = []
    for phase in phases:
        for arm, decl in bench["arms"].items():
            root = bench_dir / "runs" / phase / arm
            for run_dir in sorted(p for p in root.glob("*") if p.is_dir() and ".broken-" not in p.name):
                run = load_run(run_dir, list(decl["space"]), bench.get("tuning_seed", 0))
                if run is not None:
                    runs.append(run)
    return runs


def check_one_workload(runs: list[RunRecord], where: str) -> None:
    """Refuse (RecordError) runs that do not share one workload hash: never compared."""
    hashes = sorted({r.workload_hash for r in runs})
    if len(hashes) > 1:
        raise RecordError(f"{where}: runs of {len(hashes)} workloads ("
                          + ", ".join(f"{h[:12]}: {sum(r.workload_hash == h for r in runs)} runs" for h in hashes)
                          + "); results of different workloads are never compared")
