"""Everything train.py settles before the first FLOP: the typed config, the run directory and what the
launch finds there, the device, the data, the model, the parameter split and the optimizer. Any problem raises
SetupError (or one of its causes: ConfigError, DataError, CheckpointError, LaunchError) with a one-line message;
nothing has been written to the run directory at that point.

    prepare_run(dcfg, run_dir) -> PreparedRun     a run to train (fresh, resumed, or a new cooldown branch)
                               -> CompleteRun     train.on_complete=skip and its record is already there
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data.loader import TokenData
from harness.config.schema import Config, to_typed
from harness.config.validate import validate
from harness.lifecycle import branch as branching
from harness.lifecycle import checkpoint
from harness.lifecycle import precision as precision_choice
from harness.lifecycle.checkpoint import CheckpointError
from harness.lifecycle.records import workload_hash
from harness.lifecycle.rundir import RunLock, SetupError, check_run_dir, complete_summary, move_aside
from harness.loop.schedule import eval_steps
from harness.probes.diagnostics import Diagnostics
from harness.probes.hooks import InputHooks
from models import ROLE_GROUP, build_model
from optimizers import external
from optimizers.external import ExternalOptimizer
from optimizers.groups import ParamSplit, split_parameters
from optimizers.hybrid import CombinedOptimizer, build_optimizer
from runtime.distributed import Dist, init, world_size


@dataclass
class Trainable:
    """The model and its optimizer, built from a checked config exactly as every run builds them (perf.py
    measures these same objects)."""

    model: torch.nn.Module
    split: ParamSplit
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    input_hooks: InputHooks | None  # layer inputs for optimizers that ask for them (Newton-Muon)


@dataclass
class PreparedRun:
    cfg: Config
    resolved: dict[str, Any]  # the resolved config, as written to config.yaml
    run_dir: Path
    device: torch.device
    precision: str
    compile: bool
    data: TokenData
    model: torch.nn.Module
    split: ParamSplit
    optimizer: torch.optim.Optimizer | CombinedOptimizer
    input_hooks: InputHooks | None
    grad_accum: int
    tokens_per_step: int
    eval_steps: list[int]
    workload: dict[str, Any]
    workload_hash: str
    resume: tuple[Path, dict[str, Any]] | None = None  # (checkpoint file, its payload) when continuing a run
    # A cooldown branch (train.branch_from, harness/lifecycle/branch.py): its record ({"from", "step",
    # "parent_workload_hash", "parent_max_steps"}), and whether this launch starts it from the parent's checkpoint
    # (then that is `resume`, and the records are this run's own from the start)
    branch: dict[str, Any] | None = None
    branch_start: bool = False
    dist: Dist = field(default_factory=Dist)  # rank, world size, collectives (runtime/distributed.py)
    lock: RunLock | None = None  # held by rank 0 while the run writes its directory
    diagnostics: Diagnostics | None = None  # diagnostics.every > 0, rank 0 only (harness/probes/diagnostics.py)
    precision_probe: dict[str, Any] | None = None  # train.precision=auto's measurement (harness/lifecycle/precision.py)

    @property
    def continues(self) -> bool:
        """This launch continues its own run from its own checkpoint (not a new branch from its parent's)."""
        return self.resume is not None and not self.branch_start


@dataclass
class CompleteRun:
    """train.on_complete=skip and the run directory already holds a complete record of this workload."""

    run_dir: Path
    summary: dict[str, Any]


def workload_of(cfg: Config, data: TokenData) -> dict[str, Any]:
    """The fields that define a workload (docs/protocol.md), the shared group's settings included: results are only
    compared within one. The PC layer's `model.pc_*` options are excluded: the PC layer is compared as a method
    on the same workload (its runs record pc_level in their summary)."""
    t = cfg.train
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items()
             if not k.startswith("pc_") and not (k in ("_target_", "options") and not v)}  # unset: older hashes kept
    return {"model": model, "data": data.identity(), "seq_len": t.seq_len,
            "global_batch_tokens": t.global_batch_size * t.seq_len, "max_steps": t.max_steps,
            "val_tokens": data.num_val_tokens, "eval_steps": eval_steps(t), "target_loss": t.target_loss,
            # the shared group is part of the workload (protocol v2); absent when off (older hashes unchanged)
            **({"hybrid": dataclasses.asdict(cfg.hybrid)} if cfg.hybrid.enabled else {})}


def build_trainable(cfg: Config, spec: Any, device: torch.device, dist: Dist | None = None) -> Trainable:
    """Model (seeded by `seed`), parameter split and optimizer; under FSDP the model is sharded first."""
    torch.manual_seed(cfg.seed)
    try:  # checked against the model interface right after construction (models/__init__.py: check_model)
        model = build_model(cfg.model).to(device)
    except ValueError as e:  # a user's model class (model._target_) that lacks a piece: one line naming it
        raise SetupError(str(e)) from None
    if dist is not None and dist.fsdp:
        dist.shard(model, device)  # before the optimizer: it must hold the sharded parameters
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    try:
        optimizer = build_optimizer(spec, split, cfg.hybrid)
    except ValueError as e:  # a method that cannot run on this model (Adam-mini's per-head roles without a layout)
        raise SetupError(f"optimizer: {' '.join(str(e).split())[:300]}") from None
    for group in optimizer.param_groups:  # the schedule scales this peak value at every step
        group["peak_lr"] = group["lr"]
    return Trainable(model, split, optimizer, InputHooks.attach(model, optimizer, split.params("hidden")))


def prepare_run(dcfg: DictConfig, run_dir: Path) -> PreparedRun | CompleteRun:
    cfg = to_typed(dcfg)
    spec = validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.parallel == "fsdp" and world_size() > 1:
        check_fsdp(cfg, spec)  # before the process group forms: a refused rank must not leave others waiting
    device, dist = init(cfg.train.device, cfg.train.parallel)  # one process, or this rank of a launch
    lock = RunLock(run_dir) if dist.is_rank0 else None
    try:
        result = _prepare(dcfg, cfg, spec, run_dir, device, dist, lock)
    except BaseException:
        if lock is not None:
            lock.release()  # refused: leave the directory as it was
        raise
    if isinstance(result, CompleteRun) and lock is not None:
        lock.release()
    return result


def _prepare(dcfg: DictConfig, cfg: Config, spec: Any, run_dir: Path, device: torch.device, dist: Dist,
             lock: RunLock | None) -> PreparedRun | CompleteRun:
    t = cfg.train
    done = complete_summary(run_dir) if t.on_complete == "skip" else None
    resume = None
    if done is None and t.resume and not (run_dir / "summary.json").exists():
        try:
            resume = checkpoint.load_latest(run_dir)
        except CheckpointError as e:
            if t.on_broken != "move_aside":
                raise
            if dist.is_rank0:
                move_aside(run_dir, f"{e}")  # the run starts afresh; the damaged checkpoint is kept aside
    branch_start = done is None and resume is None and t.branch_from is not None
    if branch_start:  # a new branch: resumed from its parent's checkpoint, into this (fresh) run directory
        resume = branching.load_parent(cfg, run_dir)
    if done is None:  # a complete run (on_complete=skip) is compared by workload below, never touched
        check_run_dir(run_dir, on_broken=t.on_broken, resuming=resume is not None and not branch_start,
                      writer=dist.is_rank0)
    if lock is not None and not lock.path.exists():  # the broken run was moved aside with its lock file
        lock.release()
        lock = RunLock(run_dir)
    dist.barrier()  # the other ranks go on once rank 0 has set up (or moved aside) the run directory

    data_dir = cfg.data.resolve_dir()  # a relative data.dir: from the directory train.py was launched in
    # TokenData checks every shard header/size and meta.json (incl. the tokenizer's vocab) before any compute
    data = TokenData(data_dir, cfg.data, cfg.train.seq_len)
    data.check_vocab(cfg.model.vocab_size)

    workload = workload_of(cfg, data)
    if done is not None:
        if done["workload_hash"] != workload_hash(workload):
            raise SetupError(f"run directory {run_dir} holds a complete run of another workload "
                             f"({done['workload_hash'][:12]}); results of different workloads are never mixed")
        return CompleteRun(run_dir, done)
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    resolved["data"]["dir"] = data_dir  # config.yaml names the directory read, absolute (readers need no cwd)
    branch = resume[1].get("branch") if resume is not None else None  # a branch's own checkpoint carries it
    if branch_start:
        branch = branching.check_parent(*resume, cfg, resolved, lambda c: workload_hash(workload_of(c, data)))
    elif resume is not None:
        checkpoint.check_layout(*resume, dist)  # an FSDP checkpoint: the same world size, train.parallel=fsdp
        checkpoint.check_compatible(*resume, workload_hash(workload), resolved)

    built = build_trainable(cfg, spec, device, dist)
    if resume is not None:
        load_state(resume[0], resume[1], built.model, built.optimizer)
    grad_accum = t.global_batch_size // (t.micro_batch_size * dist.world)
    # auto on a CPU: timed on this model (harness/lifecycle/precision.py); a continued run or branch keeps its own
    precision, precision_probe = precision_choice.choose(
        t.precision, device, cfg.model, t.micro_batch_size, t.seq_len,
        resume[0].parent.parent if resume is not None else None, dist.world)
    diagnostics = None
    if cfg.diagnostics.every and dist.is_rank0:  # rank 0 probes its own replica (DDP); FSDP is refused above
        diagnostics = Diagnostics(cfg.diagnostics, built.model, built.split, built.optimizer, data, t, grad_accum,
                                  device, precision, run_dir / "diagnostics.jsonl", rank=dist.rank, world=dist.world)
    return PreparedRun(cfg=cfg, resolved=resolved, run_dir=run_dir, device=device, precision=precision,
                       precision_probe=precision_probe,
                       compile=device.type == "cuda" if t.compile is None else t.compile, data=data,
                       model=built.model, split=built.split, optimizer=built.optimizer, input_hooks=built.input_hooks,
                       grad_accum=grad_accum, tokens_per_step=t.global_batch_size * t.seq_len,
                       eval_steps=workload["eval_steps"], workload=workload, workload_hash=workload_hash(workload),
                       resume=resume, branch=branch, branch_start=branch_start, dist=dist, lock=lock,
                       diagnostics=diagnostics)


def check_fsdp(cfg: Config, spec: Any) -> None:
    """What train.parallel=fsdp does not support, refused before any compute (docs/distributed.md, "FSDP2")."""
    if not getattr(spec, "supports_fsdp", False):
        name = getattr(spec, "target", None) or type(spec).__name__.removesuffix("Spec")  # ExternalSpec: the class
        raise SetupError(f"optimizer: {name} does not run on FSDP-sharded parameters "
                         "(train.parallel=fsdp supports AdamW, Muon, NorMuon, Newton-Muon and PolarGrad); use "
                         "train.parallel=ddp")
    if cfg.model.pc_level:
        raise SetupError("model.pc_level: PC layers are not supported with train.parallel=fsdp (their power "
                         "iteration reads the whole weight between steps); use train.parallel=ddp")
    if cfg.diagnostics.every:
        raise SetupError("diagnostics.every: diagnostics read whole weights and run Hessian-vector products on one "
                         "replica, which train.parallel=fsdp does not keep; set diagnostics.every=0 or use "
                         "train.parallel=ddp")
    if cfg.train.branch_from is not None:
        raise SetupError("train.branch_from: cooldown branches of train.parallel=fsdp runs are not implemented (an "
                         "FSDP checkpoint resumes its own run only); use train.parallel=ddp")


def load_state(path: Path, payload: dict[str, Any], model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer state from a checkpoint (a sharded one's read first, by every rank: a collective);
    a mismatch (renamed parameters, another optimizer layout) is an incompatible code version, reported in one
    line."""
    if path.is_dir():
        checkpoint.load_shards(path, payload, model)
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


def optimizer_name(optimizer) -> str:
    """How the records name the optimizer object: CombinedOptimizer(Muon, AdamW), AdamW, or an external class's
    name (SGD: optimizers/external.py)."""
    if isinstance(optimizer, CombinedOptimizer):
        return repr(optimizer)
    return optimizer.name if isinstance(optimizer, ExternalOptimizer) else type(optimizer).__name__


def external_lines(optimizer) -> list[str]:
    """The banner's line for an external optimizer: its class with every keyword argument it runs with."""
    rec = external.record(optimizer)
    if rec is None:
        return []
    kwargs = ", ".join(f"{k}={v!r}" for k, v in rec["kwargs"].items())
    return [(f"external     {rec['class']}({kwargs}); _params_: {rec['params']}, closure: {rec['closure']}, "
             f"package: {rec['package'] or 'a local module'}")]


def banner(run: PreparedRun) -> str:
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
        *external_lines(run.optimizer),
        *([f"shared group {run.cfg.hybrid.adamw()} on embeddings, head, gains/biases (hybrid; replaces any aux)"]
          if run.cfg.hybrid.enabled else []),
        (f"batch        {t.global_batch_size} seq x {t.seq_len} tok = {run.tokens_per_step:,} tokens/step "
         f"({t.micro_batch_size} micro x {run.grad_accum} accum x {run.dist.world} proc)"),
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
