"""Checkpoints: everything a run needs to continue bit-exactly after a crash, written atomically.

A checkpoint (RUN_DIR/checkpoints/step_<step>.pt, every train.ckpt_every steps) holds the model's state
(PC layers' power-iteration vectors included: they are buffers), the optimizer's state (every member of a
CombinedOptimizer, Newton-Muon's input statistics and K^-1, NorMuon's second moments, ...), the loop's own state
(step, accumulated training and optimizer time, the divergence watch), the RNG states, the metrics lines
written so far, the W&B run id, the workload hash, the resolved config and the code version. The data
position is the step itself: batches are a pure function of (data.seed, step, micro-batch).

Re-launching the same command on the same run directory resumes from the newest checkpoint:

    python train.py experiment=bench_tiny hydra.run.dir=results/runs/mine   # killed at step 173
    python train.py experiment=bench_tiny hydra.run.dir=results/runs/mine   # resumes from step 150

It is refused, with one line naming the file and the problem, when the checkpoint is unreadable
(truncated), of another format version, of another workload (hash), or of another config (a changed
hyperparameter); the run directory is left as it is.

Checkpoints after the steps listed in train.ckpt_steps are pinned: never rotated away, never deleted when the
run completes. A cooldown branch (train.branch_from, harness/lifecycle/branch.py) starts from one of them.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1  # bump when the payload's layout changes; older checkpoints are then refused, never misread
DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
# Config keys that may differ between the interrupted launch and the resuming one: they change how the run
# is watched or where it runs, never what it computes.
RUNTIME_KEYS = ("train.progress", "train.threads", "train.on_complete", "train.on_broken", "train.on_crash", "train.ckpt_every", "train.ckpt_keep",
                "train.ckpt_keep_final", "train.ckpt_steps", "train.resume", "train.save_final", "wandb", "diagnostics")


class CheckpointError(ValueError):
    """An unreadable, foreign or incompatible checkpoint; the one-line message names the file."""


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest first."""
    folder = Path(run_dir) / DIR
    found = [p for p in folder.iterdir() if _NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def path_of(run_dir: Path, step: int) -> Path:
    """Where the checkpoint after `step` steps lives (whether or not it exists)."""
    return Path(run_dir) / DIR / f"step_{step:08d}.pt"


def step_of(path: Path) -> int:
    return int(_NAME.match(Path(path).name).group(1))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()  # (name, uint32 keys, pos, has_gauss, gauss): keys as a tensor for weights_only
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(run_dir: Path, step: int, payload: dict[str, Any], keep: int, pinned: Collection[int] = ()) -> Path:
    """Write step_<step>.pt atomically (temporary file, fsync, rename, fsync of the folder), then delete all
    but the newest `keep` checkpoints, those of the `pinned` steps (train.ckpt_steps) excepted: they are neither
    deleted nor counted. A kill at any moment leaves the previous checkpoints intact."""
    folder = Path(run_dir) / DIR
    folder.mkdir(exist_ok=True)
    path = path_of(run_dir, step)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "step": step, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for old in [p for p in checkpoints(run_dir) if step_of(p) not in pinned][:-keep]:
        old.unlink(missing_ok=True)
    return path


def remove_all(run_dir: Path, pinned: Collection[int] = ()) -> None:
    """Delete the run's checkpoints (and stale temporary files) once its records are complete, those of the
    `pinned` steps (train.ckpt_steps: branches start from them) excepted."""
    folder = Path(run_dir) / DIR
    if folder.is_dir():
        for p in folder.iterdir():
            if (_NAME.match(p.name) and step_of(p) not in pinned) or p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def load_latest(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint, loaded with torch.load(weights_only=True), or None when there is none.
    A checkpoint that cannot be read, or is of another format, raises CheckpointError: a damaged newest file
    is never silently skipped (the older ones are named in the message)."""
    found = checkpoints(run_dir)
    if not found:
        return None
    path, older = found[-1], found[:-1]
    hint = (f"; move it away to resume from {older[-1].name}" if older else
            "; move it away (or the run directory) to start afresh")
    return path, load(path, hint)


def load(path: Path, hint: str = "") -> dict[str, Any]:
    """One checkpoint's payload, checked for readability, format and completeness (CheckpointError if not)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncation shows as several error types (EOF, zip, unpickling)
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else ''}){hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found_format = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        written_by = payload.get("code", {}).get("commit") if isinstance(payload, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found_format} (written by code {written_by}), this code "
                              f"reads format {FORMAT}: incompatible code version{hint}")
    missing = {"step", "workload_hash", "config", "model", "optimizer", "rng", "loop", "metrics"} - payload.keys()
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(sorted(missing))} (incompatible code version)"
                              f"{hint}")
    return payload


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_changes(saved: dict[str, Any], current: dict[str, Any], ignore: Collection[str] = RUNTIME_KEYS) -> list[str]:
    """`key: saved -> current` for every config value that differs (sorted by key), the `ignore` keys (and
    everything under them; default: the runtime-only keys) excepted."""
    a, b = _flat(saved), _flat(current)

    def runtime(key: str) -> bool:
        return any(key == r or key.startswith(r + ".") for r in ignore)

    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(a.keys() | b.keys())
            if not runtime(k) and a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_compatible(path: Path, payload: dict[str, Any], workload_hash: str, resolved: dict[str, Any]) -> None:
    """Refuse a checkpoint of another workload or another config (the relaunch must be the same command)."""
    if payload["workload_hash"] != workload_hash:
        raise CheckpointError(f"{path}: checkpoint of another workload ({payload['workload_hash'][:12]}, this "
                              f"config is {workload_hash[:12]}); results of different workloads are never mixed")
    changes = config_changes(payload["config"], resolved)
    if changes:
        more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
        raise CheckpointError(f"{path}: written with another config: {'; '.join(changes[:3])}{more}; relaunch "
                              "with the original overrides to resume")


def resume_note(path: Path, payload: dict[str, Any], code: dict[str, Any]) -> dict[str, Any]:
    """The record of one resume (kept in env.json and summary.json)."""
    return {"from_step": payload["step"], "checkpoint": path.name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "code": code.get("commit"), "checkpoint_code": payload.get("code", {}).get("commit")}
