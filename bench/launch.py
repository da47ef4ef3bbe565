"""Launch a phase's missing runs as one Hydra multirun of train.py (basic, joblib or SLURM launcher).

Each run gets a generated trial config (<out>/conf/trial/<name>.yaml, kept for the record); the multirun's
sweep directory puts it at runs/<phase>/<arm>/<trial>. Runs whose records are complete are not launched
again; train.on_complete=skip covers a run that completed between the check and the launch.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.declaration import LAUNCHERS, REPO, BenchConfig, BenchError
from bench.plan import PlannedRun, trial_config
from bench.supervise import with_parent
from harness.config.search import with_user_dirs
from harness.lifecycle.rundir import complete_summary


def add_launch_options(p) -> None:
    """--launcher, --jobs, --threads, --logger: how a benchmark's (or a ladder's) runs are launched, each
    defaulting to the declaration's (scripts/bench.py, scripts/ladder.py)."""
    p.add_argument("--launcher", choices=LAUNCHERS, help="how runs are launched (default: the declaration's "
                   "launcher): basic = one after another on this machine, joblib = --jobs in parallel "
                   "here, slurm = submitit jobs through conf/hydra/launcher/slurm.yaml")
    p.add_argument("--jobs", type=int, help="parallel runs (joblib/slurm; default: the declaration's jobs)")
    p.add_argument("--threads", type=int, help="torch threads per run (default: the declaration's; 0 = torch's "
                   "default); parallel CPU runs want cores / jobs")
    p.add_argument("--logger", choices=("wandb", "none"), help="per-run logging (default: the declaration's; wandb "
                   "runs offline without an API key)")


def hydra_command(b: BenchConfig, out: Path, names: list[str]) -> list[str]:
    """train.py's multirun of these trial configs; the search path lists <out>/conf, then the user's config
    directories (OPTBENCH_CONFIG_PATH, which the multirun inherits with absolute paths: activate)."""
    searchpath = with_user_dirs([f"hydra.searchpath=[file://{(out / 'conf').resolve()}]"])
    cmd = [sys.executable, str(REPO / "train.py"), "-m", f"experiment={b.experiment}", *b.overrides,
           *searchpath, f"+trial={','.join(names)}",
           f"hydra.sweep.dir={out.resolve() / 'runs'}", "hydra.sweep.subdir=${bench.phase}/${bench.arm}/${bench.trial}",
           "train.on_complete=skip", "train.on_broken=move_aside", "train.on_crash=record", "train.progress=false", "train.save_final=false",
           f"train.threads={b.threads}", f"logger={b.logger}",
           *([f"train.precision={b.precision_used}"] if b.precision_used else [])]
    if b.launcher == "joblib":
        cmd += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={b.jobs}"]
    elif b.launcher == "slurm":
        cmd += ["hydra/launcher=slurm"]
    return cmd


def launch(b: BenchConfig, out: Path, label: str, runs: list[PlannedRun], hybrid: dict[str, Any],
           dry_run: bool = False) -> None:
    """Write the trial configs of the runs not yet complete and launch them as one multirun, with a progress
    bar (runs done / total, ETA) fed by the records appearing on disk."""
    todo = [r for r in runs if complete_summary(r.dir(out)) is None]
    print(f"{label}: {len(runs)} runs, {len(runs) - len(todo)} complete, {len(todo)} to run", flush=True)
    if not todo:
        return
    names = []
    for i, r in enumerate(todo):  # file names stay plain (Hydra parses `+trial=a,b`); the trial id lives inside
        name = f"{r.phase}__{r.arm}__{r.trial}".replace("=", "-").replace(",", "_").replace(".", "p")
        names.append(name)
        if not dry_run:
            (out / "conf" / "trial").mkdir(parents=True, exist_ok=True)
            (out / "conf" / "trial" / f"{name}.yaml").write_text(trial_config(b, r, hybrid, out))
    cmd = hydra_command(b, out, names)
    if dry_run:
        for r in todo:
            print(f"  {r.arm:<14} {r.trial:<36} seed {r.seed} budget {r.budget}")
        return
    log_path = out / "logs" / f"{label.split()[0]}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, tqdm(total=len(todo), desc=label, unit="run", dynamic_ncols=True,
                                        mininterval=2.0) as bar:
        # Linux: under bench/supervise.py, so that the multirun and its workers end when this driver dies,
        # even by SIGKILL: a killed benchmark leaves no run training on behind it
        proc = subprocess.Popen(with_parent(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(2.0):
                done = sum(complete_summary(r.dir(out)) is not None for r in todo)
                if done > bar.n:  # redraw only on progress: logs of non-interactive runs stay short
                    bar.update(done - bar.n)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C (KeyboardInterrupt), another exception: the multirun's group ends first
            proc.terminate()  # the supervisor's SIGTERM: it ends the whole group, SIGKILL after its grace
            proc.wait()
            raise
        stop.set()
        watcher.join()
        bar.update(sum(complete_summary(r.dir(out)) is not None for r in todo) - bar.n)
    if code != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise BenchError(f"{label}: the Hydra multirun failed (exit {code}); log {log_path}:\n" + "\n".join(tail))
