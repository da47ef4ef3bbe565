"""Everything train.py must settle before the first FLOP: the typed config, the run directory, the device,
the data, the model, the parameter split and the optimizer. Any problem raises SetupError (or one of its
causes) with a one-line message; nothing has been written to the run directory at that point.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.loader import TokenData
from harness import branch as branching
from harness import checkpoint
from harness.checkpoint import CheckpointError
from harness.config import Config, ConfigError, validate, world_size
from harness.diagnostics import Diagnostics
from harness.hooks import InputHooks
from harness.records import REPO, workload_hash
from harness.schedule import eval_steps
from models import ROLE_GROUP, build_model
from optimizers.groups import ParamSplit, split_parameters
from optimizers.hybrid import Hybrid, build_optimizer
from runtime.device import resolve_precision
from runtime.distributed import Dist, init

RECORD_FILES = ("summary.json", "metrics.jsonl", "model_final.pt", "diagnostics.jsonl")
LOCK_FILE = ".lock"


class SetupError(RuntimeError):
    """A run that must not start (config, data, or run-directory problem)."""


@dataclass
class Run:
    cfg: Config
    resolved: dict[str, Any]  # the resolved config, as written to config.yaml
    run_dir: Path
    device: torch.device
    precision: str
    compile: bool
    data: TokenData
    model: torch.nn.Module
    split: ParamSplit
    optimizer: torch.optim.Optimizer | Hybrid
    input_hooks: InputHooks | None  # layer inputs for optimizers that ask for them (Newton-Muon)
    world_size: int
    grad_accum: int
    tokens_per_step: int
    eval_steps: list[int]
    workload: dict[str, Any]
    workload_hash: str
    resume: tuple[Path, dict[str, Any]] | None = None  # (checkpoint file, its payload) when continuing a run
    # A cooldown branch (train.branch_from, harness/branch.py): its record ({"from", "step", "parent_workload_hash",
    # "parent_max_steps"}), and whether this launch starts it from the parent's checkpoint (then that is `resume`)
    branch: dict[str, Any] | None = None
    branch_start: bool = False
    dist: Dist = field(default_factory=Dist)  # rank, world size, collectives (runtime/distributed.py)
    lock: RunLock | None = None  # held by rank 0 while the run writes its directory
    diagnostics: Diagnostics | None = None  # diagnostics.every > 0, rank 0 only (harness/diagnostics.py)


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


def to_typed(dcfg: DictConfig) -> Config:
    try:
        return OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None


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


def check_run_dir(run_dir: Path, skip_complete: bool = False, resuming: bool = False, writer: bool = True) -> None:
    """Refuse a directory that already holds a run's records: results are never overwritten. A run being
    resumed from its checkpoint owns its records. With skip_complete (benchmarks), an incomplete record
    without a checkpoint is moved aside to <dir>.broken-<time> (kept, never deleted) so the run starts
    afresh; a complete one is handled by the caller (skipped). Only the `writer` (rank 0) moves or creates
    anything; every rank refuses the same way."""
    taken = [f for f in RECORD_FILES if (run_dir / f).exists()]
    if resuming:
        pass
    elif taken and skip_complete and complete_summary(run_dir) is None:
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


def workload_of(cfg: Config, data: TokenData) -> dict[str, Any]:
    """The fields that define a workload (protocol.md), the shared group's settings included: results are only
    compared within one. The PC layer's
    `model.pc_*` options are excluded: the PC layer is compared as a method on the same workload (its
    runs record pc_level in their summary)."""
    t = cfg.train
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if not k.startswith("pc_")}
    return {"model": model, "data": data.identity(), "seq_len": t.seq_len,
            "global_batch_tokens": t.global_batch_size * t.seq_len, "max_steps": t.max_steps,
            "val_tokens": data.num_val_tokens, "eval_steps": eval_steps(t), "target_loss": t.target_loss,
            # the shared group is part of the workload (protocol v2); absent when off (older hashes unchanged)
            **({"hybrid": dataclasses.asdict(cfg.hybrid)} if cfg.hybrid.enabled else {})}


def setup(dcfg: DictConfig, run_dir: Path) -> Run | dict:
    """The Run to train, or, with train.skip_complete and a complete record of the same workload already in
    run_dir, that record's summary (nothing to do)."""
    cfg = to_typed(dcfg)
    spec = validate(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    if t.parallel == "fsdp" and world_size() > 1:
        check_fsdp(cfg, spec)  # before the process group forms: a refused rank must not leave others waiting
    device, dist = init(t.device, t.parallel)  # one process, or this rank of a torchrun / accelerate launch
    lock = RunLock(run_dir) if dist.main else None
    try:
        result = _setup(dcfg, cfg, spec, run_dir, device, dist, lock)
    except BaseException:
        if lock is not None:
            lock.release()  # refused: leave the directory as it was
        raise
    if isinstance(result, dict) and lock is not None:
        lock.release()  # a complete run, skipped
    return result


def _setup(dcfg: DictConfig, cfg: Config, spec: Any, run_dir: Path, device: torch.device, dist: Dist,
           lock: RunLock | None) -> Run | dict:
    t = cfg.train
    done = complete_summary(run_dir) if t.skip_complete else None
    resume = None
    if done is None and t.resume and not (run_dir / "summary.json").exists():
        try:
            resume = checkpoint.load_latest(run_dir)
        except CheckpointError as e:
            if not t.skip_complete:
                raise
            if dist.main:
                move_aside(run_dir, f"{e}")  # a benchmark survives a damaged checkpoint: rerun that run afresh
    branch_start = done is None and resume is None and t.branch_from is not None
    if branch_start:  # a new branch: resumed from its parent's checkpoint, into this (fresh) run directory
        resume = branching.load_parent(cfg, run_dir)
    if done is None:  # a complete run (skip_complete) is compared by workload below, never touched
        check_run_dir(run_dir, skip_complete=t.skip_complete, resuming=resume is not None and not branch_start,
                      writer=dist.main)
    if lock is not None and not lock.path.exists():  # the broken run was moved aside with its lock file
        lock.release()
        lock = RunLock(run_dir)
    dist.barrier()  # the other ranks go on once rank 0 has set up (or moved aside) the run directory

    data_dir = Path(cfg.data.dir) if Path(cfg.data.dir).is_absolute() else REPO / cfg.data.dir
    # TokenData checks every shard header/size and meta.json (incl. the tokenizer's vocab) before any compute
    data = TokenData(str(data_dir), cfg.data, cfg.train.seq_len)
    data.check_vocab(cfg.model.vocab_size)

    workload = workload_of(cfg, data)
    if done is not None:
        if done["workload_hash"] != workload_hash(workload):
            raise SetupError(f"run directory {run_dir} holds a complete run of another workload "
                             f"({done['workload_hash'][:12]}); results of different workloads are never mixed")
        return done
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    branch = resume[1].get("branch") if resume is not None else None  # a branch's own checkpoint carries it
    if branch_start:
        branch = branching.check_parent(*resume, cfg, resolved, lambda c: workload_hash(workload_of(c, data)))
    elif resume is not None:
        checkpoint.check_compatible(*resume, workload_hash(workload), resolved)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if dist.fsdp:
        dist.shard(model, device)  # before the optimizer: it must hold the sharded parameters
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    optimizer = build_optimizer(spec, split, cfg.hybrid)
    for group in optimizer.param_groups:  # the schedule scales this peak value at every step
        group["peak_lr"] = group["lr"]
    input_hooks = InputHooks.attach(model, optimizer, split.params("hidden"))
    if resume is not None:
        load_state(resume[0], resume[1], model, optimizer)

    grad_accum = t.global_batch_size // (t.micro_batch_size * dist.world)
    tokens_per_step = t.global_batch_size * t.seq_len
    precision = resolve_precision(t.precision, device)
    diagnostics = None
    if cfg.diagnostics.every and dist.main:  # rank 0 probes its own replica (DDP); FSDP is refused above
        diagnostics = Diagnostics(cfg.diagnostics, model, split, optimizer, data, t, grad_accum, device, precision,
                                  run_dir / "diagnostics.jsonl", rank=dist.rank, world=dist.world)
    return Run(cfg=cfg, resolved=resolved, run_dir=run_dir, device=device,
               precision=precision, compile=device.type == "cuda" if t.compile is None else t.compile,
               data=data, model=model, split=split, optimizer=optimizer, input_hooks=input_hooks, world_size=dist.world, grad_accum=grad_accum,
               tokens_per_step=tokens_per_step, eval_steps=workload["eval_steps"], workload=workload,
               workload_hash=workload_hash(workload), resume=resume, dist=dist, lock=lock,
               diagnostics=diagnostics, branch=branch, branch_start=branch_start)


def check_fsdp(cfg: Config, spec: Any) -> None:
    """What train.parallel=fsdp does not support, refused before any compute (README: Multi-process)."""
    if not getattr(spec, "supports_fsdp", False):
        raise SetupError(f"optimizer: {type(spec).__name__[:-4]} does not run on FSDP-sharded parameters "
                         "(train.parallel=fsdp supports AdamW, Muon, NorMuon, Newton-Muon and PolarGrad); use "
                         "train.parallel=ddp")
    if cfg.model.pc_level:
        raise SetupError("model.pc_level: PC layers are not supported with train.parallel=fsdp (their power "
                         "iteration reads the whole weight between steps); use train.parallel=ddp")
    if cfg.diagnostics.every:
        raise SetupError("diagnostics.every: diagnostics read whole weights and run Hessian-vector products on one "
                         "replica, which train.parallel=fsdp does not keep; set diagnostics.every=0 or use "
                         "train.parallel=ddp")
    if cfg.train.ckpt_every:
        raise SetupError("train.ckpt_every: checkpoints of train.parallel=fsdp runs are not implemented; set "
                         "train.ckpt_every=0 (or use train.parallel=ddp)")
    if cfg.train.ckpt_steps or cfg.train.branch_from is not None:
        raise SetupError(f"train.{'ckpt_steps' if cfg.train.ckpt_steps else 'branch_from'}: checkpoints (and so "
                         "cooldown branches) of train.parallel=fsdp runs are not implemented; use train.parallel=ddp")


def load_state(path: Path, payload: dict[str, Any], model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer state from a checkpoint; a mismatch (renamed parameters, another optimizer
    layout) is an incompatible code version, reported in one line."""
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        first = " ".join(str(e).split())[:240]
        raise CheckpointError(f"{path}: the model's parameters differ from this code's (incompatible code "
                              f"version): {first}") from None
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: the optimizer state does not fit this code's optimizer (incompatible "
                              f"code version): {e.__class__.__name__}: {str(e)[:200]}") from None


def divergence(loop: dict[str, Any], train_loss: float, factor: float, patience: int) -> str | None:
    """protocol.md rule 6, one step of the watch: why the run has diverged, or None. `loop["blowup"]` is
    factor x the initial loss (the step-0 validation loss; without one, the first training loss),
    `loop["over"]` the number of consecutive steps above it (updated here; both are checkpointed)."""
    if not math.isfinite(train_loss):
        return f"non-finite training loss ({train_loss})"
    if not math.isfinite(loop["blowup"]):
        loop["blowup"] = factor * train_loss
    loop["over"] = loop["over"] + 1 if train_loss > loop["blowup"] else 0
    if loop["over"] >= patience:
        return (f"training loss above {factor} x the initial loss ({loop['blowup']:.3f}) for {loop['over']} "
                f"consecutive steps (last {train_loss:.3f})")
    return None


def optimizer_name(optimizer) -> str:
    return repr(optimizer) if isinstance(optimizer, Hybrid) else type(optimizer).__name__


def banner(run: Run) -> str:
    """What a user should see at start: sizes, the parameter split, the batch arithmetic, the schedule."""
    m, t = run.model, run.cfg.train
    fpt = m.flops_per_token(t.seq_len)
    lines = [
        f"run dir      {run.run_dir}",
        (f"model        {run.cfg.model.family} {m.num_params():,} params ({m.num_params(non_embedding=True):,} "
         f"non-embedding), {fpt / 1e6:.2f} MFLOP/token"),
        "param groups (every trainable parameter claimed once):",
        run.split.describe(),
        f"optimizer    {optimizer_name(run.optimizer)} {run.cfg.optimizer}",
        *([f"shared group {run.cfg.hybrid.adamw()} on embeddings, head, gains/biases (hybrid; replaces any aux)"]
          if run.cfg.hybrid.enabled else []),
        (f"batch        {t.global_batch_size} seq x {t.seq_len} tok = {run.tokens_per_step:,} tokens/step "
         f"({t.micro_batch_size} micro x {run.grad_accum} accum x {run.world_size} proc)"),
        (f"budget       {t.max_steps} steps = {t.max_steps * run.tokens_per_step:,} tokens, "
         f"{len(run.eval_steps)} evaluations on {run.data.num_val_tokens:,} val tokens"),
        f"device       {run.device} precision={run.precision} compile={run.compile}",
        f"workload     {run.workload_hash[:16]}",
    ]
    if run.data.unigram_entropy_nats is not None:
        lines.append(f"data         unigram entropy {run.data.unigram_entropy_nats:.3f} nats "
                     f"(a model must get below this)")
    if t.target_loss is not None and math.isfinite(t.target_loss):
        lines.append(f"target       val loss <= {t.target_loss}")
    return "\n".join(lines)
