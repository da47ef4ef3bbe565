"""Run records: what every run writes about itself, atomically, and how results are derived from them.

A run directory holds config.yaml (resolved), env.json (code version, libraries, hardware),
metrics.jsonl (one JSON object per logged step and per evaluation), summary.json, and model_final.pt.
Scripts in scripts/ rebuild every table and plot from these files alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from runtime.files import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
LIBRARIES = ("torch", "numpy", "transformers", "datasets", "tokenizers", "hydra-core", "omegaconf", "wandb",
             "accelerate")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=True, timeout=20)
        return out.stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None


# What a run executes: everything but run outputs and committed reports, documents and tests (a commit that only
# touches those leaves the code's version, `tree`, unchanged, so a long benchmark stays one code version)
CODE_PATHS = ("--", ".", ":(exclude)results", ":(exclude)docs", ":(exclude)tests", ":(exclude)*.md")


def _not_code(path: str) -> bool:
    return path.split("/", 1)[0] in ("results", "docs", "tests") or path.endswith(".md")


def code_version() -> dict[str, Any]:
    """Commit, `tree` (a hash of the committed code's file list and blob ids, CODE_PATHS), dirty flag and a hash
    of the uncommitted diff of the code (tracked and untracked files)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "tree": None, "dirty": None, "diff_sha256": None}
    tree = "".join(line + "\n" for line in (_git("ls-tree", "-r", "HEAD") or "").splitlines()  # no pathspec magic
                   if not _not_code(line.split("\t", 1)[-1]))
    status = _git("status", "--porcelain", *CODE_PATHS) or ""
    diff = (_git("diff", "HEAD", *CODE_PATHS) or "") + (_git("ls-files", "--others", "--exclude-standard",
                                                             *CODE_PATHS) or "")
    return {"commit": commit.strip(), "tree": hashlib.sha256(tree.encode()).hexdigest(), "dirty": bool(status.strip()),
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if status.strip() else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    env = {
        "code": code_version(),
        "python": sys.version.split()[0],
        "libraries": versions,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu": {"model": _cpu_model(), "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "capability": torch.backends.cpu.get_cpu_capability()},
        "device": str(device),
        "gpu": None,
        "argv": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = {"name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count(),
                      "cuda": torch.version.cuda, "capability": list(torch.cuda.get_device_capability(device))}
    env.update(extra or {})
    return env


def workload_hash(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the workload's fields (model, data identity, sequence length, global
    batch in tokens, step budget, validation set, evaluation schedule); results with different hashes are
    never compared."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class MetricsLog:
    """metrics.jsonl, kept in memory and rewritten atomically at each flush, so the file on disk is always
    a complete, parseable prefix of the run (no torn last line after a crash)."""

    def __init__(self, path: Path, write: bool = True):
        self.path, self.records, self.lines, self.write = Path(path), [], [], write  # write: rank 0 only

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.lines.append(json.dumps(record, sort_keys=True, allow_nan=True))

    def flush(self) -> None:
        if self.write:
            atomic_write_text(self.path, "".join(line + "\n" for line in self.lines))


def state_bytes(optimizer) -> int:
    """Measured bytes of every tensor in the optimizer's state (docs/protocol.md: state memory vs AdamW's), nested
    ones included (PSGD-Kron keeps its factors in lists); a tensor held twice counts once."""
    seen: set[int] = set()

    def size(v: Any) -> int:
        if hasattr(v, "element_size") and hasattr(v, "numel"):  # a tensor (this module does not import torch)
            if id(v) in seen:
                return 0
            seen.add(id(v))
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(size(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(size(x) for x in v)
        return 0

    return sum(size(s) for s in optimizer.state.values())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(records: list[dict[str, Any]], target_loss: float | None, tokens_per_step: int,
              flops_per_token: float) -> dict[str, Any]:
    """Final/min validation loss and the *-to-target figures from the metrics records.

    Steps to target = the first evaluation step whose val loss <= target (no interpolation); tokens = steps x
    tokens/step; training time = the accumulated training clock (evaluation excluded) at that step; FLOPs =
    tokens x `flops_per_token`, the run's charged FLOPs per token (the model's and the optimizer's matmuls per
    step over the tokens per step). All None when not reached.
    """
    evals = [r for r in records if "val_loss" in r]
    finite = [r["val_loss"] for r in evals if math.isfinite(r["val_loss"])]
    out = {"final_val_loss": evals[-1]["val_loss"] if evals else None,
           "min_val_loss": min(finite) if finite else None, "target_loss": target_loss,
           "steps_to_target": None, "tokens_to_target": None, "train_time_to_target_s": None,
           "flops_to_target": None}
    if target_loss is not None:
        hit = next((r for r in evals if math.isfinite(r["val_loss"]) and r["val_loss"] <= target_loss), None)
        if hit is not None:
            out.update(steps_to_target=hit["step"], tokens_to_target=hit["step"] * tokens_per_step,
                       train_time_to_target_s=hit["train_time_s"],
                       flops_to_target=hit["step"] * tokens_per_step * flops_per_token)
    return out
