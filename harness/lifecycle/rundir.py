"""The run directory: who may write it, what a launch finds there and what it does about it.

A run directory holds one run's records (harness/lifecycle/records.py). A launch never overwrites them: it
refuses a directory that holds a record, unless the run's policies (train.on_complete, train.on_broken;
benchmarks set both) say to skip a complete one or to move a broken one aside, kept, to <dir>.broken-<time>.
Only rank 0 (`writer`) moves or creates anything; every rank refuses the same way.
"""

from __future__ import annotations

import fcntl
import json
import time
from pathlib import Path

RECORD_FILES = ("summary.json", "metrics.jsonl", "model_final.pt", "diagnostics.jsonl")
LOCK_FILE = ".lock"


class SetupError(RuntimeError):
    """A run that must not start (config, data, or run-directory problem)."""


class RunLock:
    """An exclusive flock on RUN_DIR/.lock: two processes never write one run directory (a re-run of a
    killed benchmark while an orphaned worker still trains the same run). The kernel drops the lock when
    the process dies, so a crash leaves no stale lock. `release()` unlinks the file when this process made it."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.created = not self.path.exists()
            self.file = open(self.path, "a")  # noqa: SIM115 - held open for the life of the run
        except OSError as e:
            raise SetupError(f"run directory {run_dir} is not writable ({e.strerror})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SetupError(f"run directory {run_dir} is in use by another process (it holds {self.path}); "
                             "two processes never write one run: wait for it to finish or stop it") from None

    def release(self, remove: bool = False) -> None:
        if self.file.closed:
            return
        if remove or self.created:
            self.path.unlink(missing_ok=True)
        self.file.close()


def complete_summary(run_dir: Path) -> dict | None:
    """The run's summary.json if it is a complete record (parseable, with a workload hash), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("workload_hash") else None


def move_aside(run_dir: Path, why: str) -> None:
    """Keep a broken run's files (never deleted) under <dir>.broken-<time>, so the run starts afresh."""
    aside = run_dir.with_name(f"{run_dir.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    print(f"{why}: moved to {aside}, rerunning", flush=True)


def check_run_dir(run_dir: Path, on_broken: str = "refuse", resuming: bool = False, writer: bool = True) -> None:
    """Refuse a directory that already holds a run's records: results are never overwritten. A run being
    resumed from its checkpoint owns its records. With on_broken=move_aside an incomplete record without a
    checkpoint is moved aside so the run starts afresh (a complete one the caller has skipped or refuses here)."""
    taken = [f for f in RECORD_FILES if (run_dir / f).exists()]
    if resuming:
        pass
    elif taken and on_broken == "move_aside" and complete_summary(run_dir) is None:
        if not writer:
            return
        move_aside(run_dir, f"incomplete run in {run_dir} (has {', '.join(taken)}, no checkpoint, no valid "
                            "summary.json)")
    elif taken:
        raise SetupError(f"run directory {run_dir} already holds {', '.join(taken)}; choose a new hydra.run.dir "
                         "(results are never overwritten)")
    if not writer:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write_probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"run directory {run_dir} is not writable ({e.strerror})") from None
