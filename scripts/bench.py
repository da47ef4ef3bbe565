"""Run a controlled-budget benchmark (protocol.md) end to end: tune every arm at an equal budget, re-run each
arm's chosen setting with fresh seeds, then build the report. `make bench` runs `python scripts/bench.py tiny`.

    python scripts/bench.py tiny                          # conf/bench/tiny.yaml -> results/bench_tiny/
    python scripts/bench.py cpu_hour --launcher joblib --jobs 2 --threads 1
    python scripts/bench.py gpt2_124m_fineweb --launcher slurm      # conf/hydra/launcher/slurm.yaml
    python scripts/bench.py tiny --dry-run                # the plan: every run and the Hydra commands

A benchmark is one YAML in conf/bench/ (typed by `BenchConfig` below): the workload (an experiment config
plus overrides, identical for every arm), the arms (an optimizer plus fixed options, e.g. AdamW with the PC
layer, and a grid over its search space centred on its defaults), the number of trials (equal for every
arm: the grid sizes must all equal it), the tuning seed, the seeds for the chosen setting and the target rule.

Each phase is one Hydra multirun of train.py over generated trial configs (<out>/conf/trial/*.yaml, one per
run, kept for the record), so the same declaration runs in sequence (basic launcher), in parallel on this
machine (joblib) or on a SLURM cluster (submitit). Runs whose records are complete are skipped, broken ones
are moved aside and rerun (train.skip_complete), and a benchmark directory holding another workload is
refused: re-running a benchmark only runs what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `python scripts/bench.py`

from scripts.bench_records import choose_best, load_run

LAUNCHERS = ("basic", "joblib", "slurm")


@dataclass
class ArmConfig:
    optimizer: str = MISSING  # a conf/optimizer/<name>.yaml
    description: str = ""
    set: dict[str, Any] = field(default_factory=dict)  # fixed options of the arm (e.g. model.pc_level: 4)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # swept dotted keys; the product = the trials


@dataclass
class BenchConfig:
    name: str = MISSING
    description: str = ""
    experiment: str = MISSING  # the workload: a conf/experiment/<name>.yaml ...
    overrides: list[str] = field(default_factory=list)  # ... plus these overrides, identical for every arm
    target_loss: float | None = None  # None: the reference arm's median final val loss at its chosen setting
    reference: str = "adamw"  # the arm every speedup is measured against
    muon_reference: str = "muon"
    muon_variants: list[str] = field(default_factory=list)  # also tested against muon_reference
    trials: int = 3  # the equal tuning budget: runs per arm in the tuning phase
    tuning_seed: int = 0  # model-init and data-order seed of every tuning run
    seeds: list[int] = field(default_factory=lambda: [1, 2])  # fresh seeds for the chosen setting
    launcher: str = "basic"  # basic (in sequence) | joblib (parallel on this machine) | slurm (submitit)
    jobs: int = 1  # parallel runs (joblib)
    threads: int = 0  # torch threads per run (0 = torch's default); parallel CPU runs want cores / jobs
    logger: str = "wandb"  # conf/logger: wandb (offline without an API key) | none
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    # A third phase, "diag": each arm's chosen setting re-run at the same seeds with these diagnostics.* settings
    # (harness/diagnostics.py), for the report's diagnostics section. Empty = no diag phase. Kept apart from the
    # timed seed runs (parallel probes would slow their neighbours' clocks); its losses must equal theirs.
    diagnostics: dict[str, Any] = field(default_factory=dict)


class BenchError(ValueError):
    """A benchmark declaration or directory that must not be run; reported in one line, exit code 2."""


def load_bench(name_or_path: str, **cli: Any) -> BenchConfig:
    path = Path(name_or_path)
    if not path.suffix:
        path = REPO / "conf" / "bench" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (REPO / "conf" / "bench").glob("*.yaml")))
        raise BenchError(f"bench: no {path} (known: {known})")
    try:
        node = OmegaConf.merge(OmegaConf.structured(BenchConfig), OmegaConf.load(path),
                               {k: v for k, v in cli.items() if v is not None})
        bench = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise BenchError(f"bench.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]} ({path})") from None
    validate(bench)
    return bench


def optimizer_default(optimizer: str, key: str) -> Any:
    """The value of `optimizer.<...>` in conf/optimizer/<optimizer>.yaml (None for other keys)."""
    if not key.startswith("optimizer."):
        return None
    return OmegaConf.select(OmegaConf.load(REPO / "conf" / "optimizer" / f"{optimizer}.yaml"),
                            key.removeprefix("optimizer."))


def validate(b: BenchConfig) -> None:
    """Equal budget, known optimizers and launchers, grids that contain the defaults they are centred on."""
    if b.launcher not in LAUNCHERS:
        raise BenchError(f"bench.launcher: {b.launcher!r} is not one of {', '.join(LAUNCHERS)}")
    if b.jobs < 1 or b.threads < 0 or b.trials < 1:
        raise BenchError("bench.jobs and bench.trials must be >= 1, bench.threads >= 0")
    if not b.seeds or b.tuning_seed in b.seeds or len(set(b.seeds)) != len(b.seeds):
        raise BenchError(f"bench.seeds: need distinct seeds other than the tuning seed {b.tuning_seed} "
                         f"(the chosen trial won on that seed; re-running it there would favour it), got {b.seeds}")
    if b.diagnostics:
        from harness.diagnostics import DiagnosticsConfig

        try:
            diag = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DiagnosticsConfig), b.diagnostics))
            diag.validate()
        except (OmegaConfBaseException, ValueError) as e:
            key = getattr(e, "full_key", None)
            raise BenchError(f"bench.diagnostics{'.' + key if key else ''}: {str(e).splitlines()[0]}") from None
        if not diag.every:
            raise BenchError("bench.diagnostics.every: must be > 0 for a diag phase (or leave bench.diagnostics empty)")
    if not (REPO / "conf" / "experiment" / f"{b.experiment}.yaml").is_file():
        raise BenchError(f"bench.experiment: no conf/experiment/{b.experiment}.yaml")
    for ref in (b.reference, *([b.muon_reference] if b.muon_variants else [])):
        if ref not in b.arms:
            raise BenchError(f"bench.arms: the reference arm {ref!r} is not declared")
    for arm, a in b.arms.items():
        if not (REPO / "conf" / "optimizer" / f"{a.optimizer}.yaml").is_file():
            raise BenchError(f"bench.arms.{arm}.optimizer: no conf/optimizer/{a.optimizer}.yaml")
        n = math.prod(len(v) for v in a.grid.values())
        if n != b.trials:
            raise BenchError(f"bench.arms.{arm}.grid: {n} trials, but the equal budget is bench.trials={b.trials}")
        for key, values in a.grid.items():
            default = optimizer_default(a.optimizer, key)
            if default is not None and default not in values:
                raise BenchError(f"bench.arms.{arm}.grid.{key}: the grid {values} does not contain the "
                                 f"optimizer's default {default} (grids are centred on the defaults)")


def trial_id(setting: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items()) or "default"


def plan_runs(b: BenchConfig, phase: str, chosen: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """The runs of a phase: tune = every grid point of every arm at the tuning seed; seed (and diag, the same
    runs with diagnostics on) = every arm's chosen setting at every seed. Each run: arm, phase, trial id, the
    dotted-key values it sets, seed."""
    runs = []
    for arm, a in b.arms.items():
        if phase == "tune":
            for values in itertools.product(*a.grid.values()):
                setting = dict(zip(a.grid, values))
                runs.append({"arm": arm, "trial": trial_id(setting), "setting": setting, "seed": b.tuning_seed})
        elif chosen and arm in chosen:
            for seed in b.seeds:
                runs.append({"arm": arm, "trial": f"s{seed}", "setting": chosen[arm]["setting"], "seed": seed})
    return [{**r, "phase": phase} for r in runs]


def trial_config(b: BenchConfig, run: dict[str, Any]) -> str:
    """A Hydra config (package _global_) that turns the workload into this run: the arm's optimizer, its
    fixed options, the trial's setting, the seeds and the bench tag."""
    a = b.arms[run["arm"]]
    node = OmegaConf.from_dotlist([f"{k}={json.dumps(v)}" for k, v in {**a.set, **run["setting"]}.items()])
    body = OmegaConf.to_container(node)
    body.update(seed=run["seed"], bench={"name": b.name, "arm": run["arm"], "phase": run["phase"],
                                          "trial": run["trial"]})
    body.setdefault("data", {})["seed"] = run["seed"]  # init and data order both change with the seed
    if run["phase"] == "diag":
        body["diagnostics"] = dict(b.diagnostics)
    return ("# @package _global_\n# Generated by scripts/bench.py: one run of the benchmark.\n"
            + yaml.safe_dump({"defaults": [{"override /optimizer": a.optimizer}]}, sort_keys=False)
            + yaml.safe_dump(body, sort_keys=False))


def run_dir(out: Path, run: dict[str, Any]) -> Path:
    return out / "runs" / run["phase"] / run["arm"] / run["trial"]


def is_complete(out: Path, run: dict[str, Any]) -> bool:
    """A parseable summary.json with a workload hash: what train.py writes last. Only the summary is read
    (the progress bar polls this every 2 s; metrics.jsonl can be long); an unreadable one counts as missing,
    and train.py moves such a run aside and reruns it."""
    try:
        summary = json.loads((run_dir(out, run) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and bool(summary.get("workload_hash"))


def hydra_command(b: BenchConfig, out: Path, names: list[str]) -> list[str]:
    cmd = [sys.executable, str(REPO / "train.py"), "-m", f"experiment={b.experiment}", *b.overrides,
           f"hydra.searchpath=[file://{(out / 'conf').resolve()}]", f"+trial={','.join(names)}",
           f"hydra.sweep.dir={out.resolve() / 'runs'}", "hydra.sweep.subdir=${bench.phase}/${bench.arm}/${bench.trial}",
           "train.skip_complete=true", "train.progress=false", "train.save_final=false",
           f"train.threads={b.threads}", f"logger={b.logger}"]
    if b.launcher == "joblib":
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={b.jobs}"]
    elif b.launcher == "slurm":
        cmd += ["hydra/launcher=slurm"]
    return cmd


# Linux: the multirun gets SIGTERM when this driver dies, even by SIGKILL (prctl PR_SET_PDEATHSIG = 1, set in
# the child and kept across its exec), so a killed benchmark leaves no run training on behind it.
_PDEATHSIG = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
              "os.execv(sys.argv[1], sys.argv[1:])")


def with_parent(cmd: list[str]) -> list[str]:
    return [sys.executable, "-c", _PDEATHSIG, *cmd] if sys.platform.startswith("linux") else cmd


def run_phase(b: BenchConfig, out: Path, phase: str, runs: list[dict[str, Any]], dry_run: bool) -> None:
    """Write the trial configs of the missing runs and launch them as one Hydra multirun, with a progress
    bar (runs done / total, ETA) fed by the records appearing on disk."""
    todo = [r for r in runs if not is_complete(out, r)]
    print(f"{phase}: {len(runs)} runs, {len(runs) - len(todo)} complete, {len(todo)} to run", flush=True)
    if not todo:
        return
    names = []
    for r in todo:  # file names stay plain (Hydra parses `+trial=a,b`); the trial id lives inside
        name = f"{phase}__{r['arm']}__{runs.index(r)}"
        names.append(name)
        if not dry_run:
            (out / "conf" / "trial").mkdir(parents=True, exist_ok=True)
            (out / "conf" / "trial" / f"{name}.yaml").write_text(trial_config(b, r))
    cmd = hydra_command(b, out, names)
    if dry_run:
        for r in todo:
            print(f"  {r['arm']:<12} {r['trial']:<32} seed {r['seed']}")
        print("  " + " ".join(f"'{c}'" if "$" in c or "[" in c else c for c in cmd))
        return
    log_path = out / "logs" / f"{phase}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, tqdm(total=len(todo), desc=phase, unit="run", dynamic_ncols=True,
                                        mininterval=2.0) as bar:
        proc = subprocess.Popen(with_parent(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(2.0):
                done = sum(is_complete(out, r) for r in todo)
                if done > bar.n:  # redraw only on progress: logs of non-interactive runs stay short
                    bar.update(done - bar.n)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        code = proc.wait()
        stop.set()
        watcher.join()
        bar.update(sum(is_complete(out, r) for r in todo) - bar.n)
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise BenchError(f"{phase}: the Hydra multirun failed (exit {code}); log {log_path}:\n" + "\n".join(tail))


def declaration(b: BenchConfig) -> dict[str, Any]:
    d = asdict(b)
    d["arms"] = {arm: {**asdict(a), "default": {k: optimizer_default(a.optimizer, k) for k in a.grid}}
                 for arm, a in b.arms.items()}
    return d


def open_bench_dir(b: BenchConfig, out: Path) -> dict[str, Any]:
    """bench.json of the benchmark directory: created, or checked against the declaration. A directory of
    another workload (experiment or its overrides) or another tuning protocol is refused, never mixed."""
    decl = declaration(b)
    path = out / "bench.json"
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ("experiment", "overrides", "trials", "tuning_seed"):
            if old.get(key) != decl[key]:
                raise BenchError(f"{out} holds benchmark results with {key}={old.get(key)!r}, this declaration has "
                                 f"{decl[key]!r}: results of different workloads are never mixed; use --out")
        for arm, a in decl["arms"].items():
            prev = old["arms"].get(arm)
            if prev and (prev["grid"] != a["grid"] or prev["set"] != a["set"] or prev["optimizer"] != a["optimizer"]):
                raise BenchError(f"{out}: arm {arm!r} was run with another declaration; use --out")
        decl["chosen"] = {k: v for k, v in old.get("chosen", {}).items() if k in decl["arms"]}
        decl["created"] = old.get("created")
    out.mkdir(parents=True, exist_ok=True)
    decl.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    decl["command"] = " ".join(sys.argv)
    return decl


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def choose(b: BenchConfig, out: Path, decl: dict[str, Any]) -> dict[str, dict]:
    """protocol.md rule 2: each arm's best tuning trial (scripts/bench_records.choose_best)."""
    chosen = {}
    for arm, a in b.arms.items():
        runs = [load_run(run_dir(out, r), list(a.grid)) for r in plan_runs(b, "tune") if r["arm"] == arm]
        best = choose_best([r for r in runs if r is not None], b.target_loss)
        if best is None:
            print(f"  {arm:<12} every trial diverged or is missing: no seed runs", flush=True)
            continue
        chosen[arm] = {"trial": best.trial, "setting": best.setting, "final_val_loss": best.final_loss}
        print(f"  {arm:<12} chose {best.trial} (final val loss {best.final_loss:.4f})", flush=True)
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench", help="a conf/bench/<name>.yaml name, or a path to a bench YAML")
    p.add_argument("--out", type=Path, help="benchmark directory (default results/bench_<name>)")
    p.add_argument("--launcher", choices=LAUNCHERS)
    p.add_argument("--jobs", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--logger", choices=("wandb", "none"))
    p.add_argument("--dry-run", action="store_true", help="print the plan and the Hydra commands, run nothing")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        b = load_bench(args.bench, launcher=args.launcher, jobs=args.jobs, threads=args.threads, logger=args.logger)
        out = args.out or REPO / "results" / f"bench_{b.name}"
        decl = open_bench_dir(b, out) if not args.dry_run else declaration(b)
        t0 = time.time()
        n_tune = len(plan_runs(b, "tune"))
        print(f"benchmark {b.name}: {len(b.arms)} arms x {b.trials} trials + {len(b.seeds)} seeds -> {out}\n"
              f"workload: experiment={b.experiment} {' '.join(b.overrides)}; launcher {b.launcher} "
              f"({b.jobs} jobs x {b.threads or 'default'} threads); {n_tune + len(b.arms) * len(b.seeds)} runs",
              flush=True)
        if not args.dry_run:
            write_json(out / "bench.json", decl)
        run_phase(b, out, "tune", plan_runs(b, "tune"), args.dry_run)
        if args.dry_run:
            print(f"seed: {len(b.arms) * len(b.seeds)} runs after tuning (each arm's chosen setting x seeds {b.seeds})")
            if b.diagnostics:
                print(f"diag: {len(b.arms) * len(b.seeds)} runs after those (the same with diagnostics "
                      f"{dict(b.diagnostics)})")
            return 0
        decl["chosen"] = choose(b, out, decl)
        write_json(out / "bench.json", decl)
        run_phase(b, out, "seed", plan_runs(b, "seed", decl["chosen"]), args.dry_run)
        if b.diagnostics:  # untimed re-runs with diagnostics on, after the timed ones
            run_phase(b, out, "diag", plan_runs(b, "diag", decl["chosen"]), args.dry_run)
        print(f"runs finished in {time.time() - t0:.0f} s", flush=True)
        if not args.no_report:
            from scripts.report import build_report

            paths = build_report(out)
            print(f"report: {paths['md']}\n        {paths['html']}", flush=True)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
