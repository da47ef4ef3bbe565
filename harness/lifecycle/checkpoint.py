"""Checkpoints: everything a run needs to continue bit-exactly after a crash, written atomically.

A checkpoint (RUN_DIR/checkpoints/step_<step>.pt, every train.ckpt_every steps, written by rank 0 alone in
single-process and DDP runs) holds the model's state
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

A train.parallel=fsdp run's checkpoint is a directory, step_<step>.dcp/, that every rank writes its part of
through torch.distributed.checkpoint (DCP; `save_sharded`):

    .metadata, __<rank>_0.distcp   the model's and optimizer's tensors: each rank its shards of the sharded ones
                                   (DTensors: weights, AdamW's moments), replicated ones (Muon's whole momentum) once
    state.pt                       rank 0's file: the rest of the payload above, every rank's RNG state, the layout
                                   (world size), and the model's and optimizer's state dicts with each tensor
                                   replaced by its key, shape, dtype and placements (what DCP loads into)

It is written into .step_<step>.dcp.tmp/ and renamed into place by rank 0 once every rank's part is written: a
kill leaves the previous checkpoints intact. A missing or truncated file of it is refused when it is read, before
any compute, as a damaged single file is. It resumes only a train.parallel=fsdp launch of as many processes
(`check_layout`: each rank's shards and RNG stream are its own); a single-file checkpoint resumes one process or
DDP at any world size, never FSDP. Cooldown branches from FSDP checkpoints are not implemented.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.distributed import Dist

FORMAT = 1  # bump when the payload's layout changes; older checkpoints are then refused, never misread
DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})\.(pt|dcp)$")  # .dcp: a directory (train.parallel=fsdp)
STATE = "state.pt"  # rank 0's file in a sharded checkpoint
# Config keys that may differ between the interrupted launch and the resuming one: they change how the run
# is watched or where it runs, never what it computes.
# data.dir / data.prepare say where the data is and how it is built; what it holds is in the workload hash
RUNTIME_KEYS = ("train.progress", "train.threads", "train.on_complete", "train.on_broken", "train.on_crash",
                "train.ckpt_every", "train.ckpt_keep", "train.ckpt_keep_final", "train.ckpt_steps", "train.resume",
                "train.save_final", "wandb", "diagnostics", "data.dir", "data.prepare")


class CheckpointError(ValueError):
    """An unreadable, foreign or incompatible checkpoint; the one-line message names the file."""


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoints (files, and directories of FSDP runs), oldest first."""
    folder = Path(run_dir) / DIR
    found = [p for p in folder.iterdir() if _NAME.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def path_of(run_dir: Path, step: int, sharded: bool = False) -> Path:
    """Where the checkpoint after `step` steps lives (whether or not it exists); `sharded`: an FSDP run's."""
    return Path(run_dir) / DIR / f"step_{step:08d}.{'dcp' if sharded else 'pt'}"


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


def save_run(run: Any, state: Any, recorder: Any) -> Path | None:
    """train.py's checkpoint after `state.step` steps: rank 0's single file (one process, DDP), or under
    train.parallel=fsdp a collective every rank enters (`save_sharded`). `run` is the PreparedRun, `state` its
    LoopState, `recorder` its Recorder (untyped: this module sits below all three). Returns the checkpoint's
    path on rank 0, None on the other ranks."""
    t, dist = run.cfg.train, run.dist
    fields = {}
    if dist.is_rank0:
        recorder.flush()
        fields = {"workload_hash": run.workload_hash, "config": run.resolved, "loop": state.state_dict(),
                  "branch": run.branch, **recorder.checkpoint_fields()}
    if dist.fsdp:
        return save_sharded(run.run_dir, state.step, run.model, run.optimizer, dist, fields, keep=t.ckpt_keep,
                            pinned=t.ckpt_steps)
    if not dist.is_rank0:
        return None
    return save(run.run_dir, state.step, {**fields, "model": run.model.state_dict(),
                                          "optimizer": run.optimizer.state_dict(), "rng": rng_state()},
                keep=t.ckpt_keep, pinned=t.ckpt_steps)


def save(run_dir: Path, step: int, payload: dict[str, Any], keep: int, pinned: Collection[int] = ()) -> Path:
    """Write step_<step>.pt atomically (temporary file, fsync, rename, fsync of the folder), then delete all
    but the newest `keep` checkpoints, those of the `pinned` steps (train.ckpt_steps) excepted: they are neither
    deleted nor counted. A kill at any moment leaves the previous checkpoints intact."""
    folder = Path(run_dir) / DIR
    folder.mkdir(exist_ok=True)
    path = path_of(run_dir, step)
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        _write(tmp, {"format": FORMAT, "step": step, **payload})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(folder)
    _prune(run_dir, keep, pinned)
    return path


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Any, dist: Dist,
                 payload: dict[str, Any], keep: int, pinned: Collection[int] = ()) -> Path | None:
    """An FSDP run's checkpoint, step_<step>.dcp/: a collective, every rank passing its own (sharded) model and
    optimizer; `payload` (the fields that are not model, optimizer or RNG) is rank 0's. Every rank writes its
    shards into the temporary directory with DCP, whose save ends once rank 0 has written .metadata after all
    ranks' writes; the RNG gather that follows is the barrier after which rank 0 adds state.pt, renames the
    directory into place and prunes as `save` does. Every rank returns once the checkpoint is in place (its path
    on rank 0, None elsewhere)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(run_dir) / DIR
    path = path_of(run_dir, step, sharded=True)
    tmp = folder / f".{path.name}.tmp"  # one name on every rank: all ranks write their shards into it
    if dist.is_rank0:
        folder.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
    dist.barrier()
    skeleton, tensors = _skeleton({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp))  # fsyncs its files
    rngs = dist.gather(rng_state())  # every rank's: each draws its own stream
    if dist.is_rank0:
        try:
            _write(tmp / STATE, {"format": FORMAT, "step": step, **payload, **skeleton, "rng": rngs,
                                 "layout": {"parallel": "fsdp", "world": dist.world}})
            _fsync(tmp)
            if path.exists():  # a step saved again: os.replace does not replace a non-empty directory
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(folder)
        _prune(run_dir, keep, pinned)
    dist.barrier()
    return path if dist.is_rank0 else None


def _write(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(run_dir: Path, keep: int, pinned: Collection[int]) -> None:
    for old in [p for p in checkpoints(run_dir) if step_of(p) not in pinned][:-keep]:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# A tensor's place in the state dicts stored in a sharded checkpoint's state.pt: {_TENSOR: its DCP key, "shape",
# "dtype", "device" (its type), "placements": a DTensor's (["shard:0"]), None for a plain tensor}
_TENSOR = "dcp_tensor"


def _skeleton(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """`tree` (nested dicts, lists, tuples) with each tensor replaced by its description, and the tensors by key
    (the path of dict keys and list positions, "/"-joined: "optimizer/optimizers/0/state/3/exp_avg")."""
    from torch.distributed.tensor import DTensor

    tensors: dict[str, torch.Tensor] = {}

    def placements(x: torch.Tensor) -> list[str] | None:
        if not isinstance(x, DTensor):
            return None
        if any(not (p.is_shard() or p.is_replicate()) for p in x.placements):
            raise ValueError(f"cannot checkpoint a DTensor placed {x.placements}")
        return [f"shard:{p.dim}" if p.is_shard() else "replicate" for p in x.placements]

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x
            return {_TENSOR: key, "shape": list(x.shape), "dtype": x.dtype, "device": x.device.type,
                    "placements": placements(x)}
        if isinstance(x, dict):
            return {k: walk(v, f"{key}/{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{key}/{i}") for i, v in enumerate(x))
        return x

    return walk(tree, ""), tensors


def _fill(tree: Any, tensor: Any) -> Any:
    """`tree` with each tensor description d replaced by tensor(d)."""
    if isinstance(tree, dict):
        return tensor(tree) if _TENSOR in tree else {k: _fill(v, tensor) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_fill(v, tensor) for v in tree)
    return tree


def remove_all(run_dir: Path, pinned: Collection[int] = ()) -> None:
    """Delete the run's checkpoints (and stale temporary files) once its records are complete, those of the
    `pinned` steps (train.ckpt_steps: branches start from them) excepted."""
    folder = Path(run_dir) / DIR
    if folder.is_dir():
        for p in folder.iterdir():
            if (_NAME.match(p.name) and step_of(p) not in pinned) or p.name.endswith(".tmp"):
                _remove(p)
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
    """One checkpoint's payload, checked for readability, format and completeness (CheckpointError if not).
    A sharded checkpoint's is its state.pt, its shard files checked for presence and length (`load_shards`
    reads them into the payload once the model is built)."""
    path = Path(path)
    try:
        payload = torch.load(path / STATE if path.is_dir() else path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncation shows as several error types (EOF, zip, unpickling)
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_first_line(e)}){hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found_format = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        written_by = payload.get("code", {}).get("commit") if isinstance(payload, dict) else None
        raise CheckpointError(f"{path}: checkpoint format {found_format} (written by code {written_by}), this code "
                              f"reads format {FORMAT}: incompatible code version{hint}")
    missing = {"step", "workload_hash", "config", "model", "optimizer", "rng", "loop", "metrics"} - payload.keys()
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(sorted(missing))} (incompatible code version)"
                              f"{hint}")
    if path.is_dir():
        _check_shards(path, payload, hint)
    return payload


def _first_line(e: BaseException) -> str:
    return f"{e.__class__.__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _check_shards(path: Path, payload: dict[str, Any], hint: str) -> None:
    """Every tensor of a sharded checkpoint's state dicts listed in DCP's .metadata, and every byte range that
    lists present in its files: a killed copy or a truncated file is refused before any compute."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing (OSError) or truncated (EOF, unpickling)
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt (.metadata: {_first_line(e)})"
                              f"{hint}") from None
    keys: set[str] = set()
    _fill([payload["model"], payload["optimizer"]], lambda d: keys.add(d[_TENSOR]))
    absent = sorted(keys - metadata.state_dict_metadata.keys())
    if absent:
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt (.metadata lacks {len(absent)} "
                              f"tensors: {absent[0]}, ...){hint}")
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({name}: "
                                  f"{'missing' if size is None else f'{size} of {end} bytes'}){hint}")


def load_shards(path: Path, payload: dict[str, Any], model: torch.nn.Module) -> None:
    """Complete a sharded checkpoint's payload (from `load`) in place for this rank: its "model" and "optimizer"
    become state dicts, each tensor read by DCP (a collective) into an empty one of the saved shape, dtype and
    placements on the device mesh of `model` (the freshly sharded model), and its "rng" this rank's state."""
    import torch.distributed as torch_dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Replicate, Shard, empty

    mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))
    tensors: dict[str, torch.Tensor] = {}

    def template(d: dict[str, Any]) -> None:
        if d["placements"] is None:
            tensors[d[_TENSOR]] = torch.empty(d["shape"], dtype=d["dtype"],
                                              device="cpu" if d["device"] == "cpu" else mesh.device_type)
        else:
            placements = [Shard(int(p[6:])) if p.startswith("shard:") else Replicate() for p in d["placements"]]
            tensors[d[_TENSOR]] = empty(d["shape"], dtype=d["dtype"], device_mesh=mesh, placements=placements)

    _fill([payload["model"], payload["optimizer"]], template)
    try:
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(path))
    except Exception as e:  # noqa: BLE001 - DCP gathers every rank's failure into one CheckpointException
        raise CheckpointError(f"{path}: unreadable checkpoint, truncated or corrupt ({_first_line(e)})") from None
    for part in ("model", "optimizer"):
        payload[part] = _fill(payload[part], lambda d: tensors[d[_TENSOR]])
    payload["rng"] = payload["rng"][torch_dist.get_rank()]


def check_layout(path: Path, payload: dict[str, Any], dist: Dist) -> None:
    """Refuse a resume across process layouts. A sharded checkpoint continues only a train.parallel=fsdp launch
    of as many processes: DCP would reshard the tensors, but every rank's RNG stream is its own and another world
    size reduces gradients in another order, so the run would not be the uninterrupted one. An FSDP launch resumes
    only from a sharded checkpoint; single-file checkpoints resume one process and DDP launches of any size."""
    layout = payload.get("layout")  # sharded checkpoints only
    if layout is None and dist.fsdp:
        raise CheckpointError(f"{path}: a single-file checkpoint (one process or train.parallel=ddp); a "
                              "train.parallel=fsdp launch resumes only from its own step_<N>.dcp checkpoints")
    if layout is not None and (not dist.fsdp or layout["world"] != dist.world):
        this = f"{'train.parallel=fsdp' if dist.fsdp else 'not train.parallel=fsdp'} with {dist.world} process(es)"
        raise CheckpointError(f"{path}: checkpoint of a {layout['world']}-process train.parallel=fsdp run, this "
                              f"launch is {this}; relaunch with train.parallel=fsdp on {layout['world']} "
                              "processes to resume")


def whole_weights(model: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The model's whole state dict on rank 0 (model_final.pt), None on the other ranks. Under FSDP a collective
    that every rank enters: each sends its shards, rank 0 keeps the whole, on the CPU."""
    if not dist.fsdp:
        return model.state_dict() if dist.is_rank0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights if dist.is_rank0 else None


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

    def unset(value: Any) -> bool:  # a key this code added, left at its "off" value (model._target_: null)
        return value is None or value == {} or value == []

    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(a.keys() | b.keys())
            if not runtime(k) and a.get(k, "<absent>") != b.get(k, "<absent>")
            and not (unset(a.get(k)) and unset(b.get(k)))]


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
