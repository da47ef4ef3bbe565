"""Everything train.py must settle before the first FLOP: the typed config, the run directory, the device,
the data, the model, the parameter split and the optimizer. Any problem raises SetupError (or one of its
causes) with a one-line message; nothing has been written to the run directory at that point.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.loader import TokenData
from data.shards import DataError
from harness.config import Config, ConfigError, validate, world_size
from harness.device import resolve_device, resolve_precision
from harness.hooks import InputHooks
from harness.records import REPO, workload_hash
from harness.schedule import eval_steps
from models import ROLE_GROUP, build_model
from optimizers.groups import ParamSplit, split_parameters
from optimizers.hybrid import Hybrid

RECORD_FILES = ("summary.json", "metrics.jsonl", "model_final.pt")


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


def check_run_dir(run_dir: Path, skip_complete: bool = False) -> None:
    """Refuse a directory that already holds a run's records: results are never overwritten. With
    skip_complete (benchmarks), an incomplete record is moved aside to <dir>.broken-<time> (kept, never
    deleted) so the run starts afresh; a complete one is handled by the caller (skipped)."""
    taken = [f for f in RECORD_FILES if (run_dir / f).exists()]
    if taken and skip_complete and complete_summary(run_dir) is None:
        aside = run_dir.with_name(f"{run_dir.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"incomplete run in {run_dir} (has {', '.join(taken)}, no valid summary.json): moved to {aside}, "
              "rerunning", flush=True)
    elif taken:
        raise SetupError(f"run directory {run_dir} already holds {', '.join(taken)}; choose a new hydra.run.dir "
                         "(results are never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write_probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"run directory {run_dir} is not writable ({e.strerror})") from None


def workload_of(cfg: Config, data: TokenData) -> dict[str, Any]:
    """The fields that define a workload (protocol.md): results are only compared within one. The PC layer's
    `model.pc_*` options are excluded: the PC layer is compared as a method on the same workload (its
    runs record pc_level in their summary)."""
    t = cfg.train
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if not k.startswith("pc_")}
    return {"model": model, "data": data.identity(), "seq_len": t.seq_len,
            "global_batch_tokens": t.global_batch_size * t.seq_len, "max_steps": t.max_steps,
            "val_tokens": data.num_val_tokens, "eval_steps": eval_steps(t), "target_loss": t.target_loss}


def setup(dcfg: DictConfig, run_dir: Path) -> Run | dict:
    """The Run to train, or, with train.skip_complete and a complete record of the same workload already in
    run_dir, that record's summary (nothing to do)."""
    cfg = to_typed(dcfg)
    spec = validate(cfg)
    done = complete_summary(run_dir) if cfg.train.skip_complete else None
    check_run_dir(run_dir, skip_complete=cfg.train.skip_complete and done is None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    ws = world_size()
    if ws != 1:
        raise SetupError(f"WORLD_SIZE={ws}: multi-process training is not implemented yet; run one process")

    data_dir = Path(cfg.data.dir) if Path(cfg.data.dir).is_absolute() else REPO / cfg.data.dir
    # TokenData checks every shard header/size and meta.json (incl. the tokenizer's vocab) before any compute
    data = TokenData(str(data_dir), cfg.data, cfg.train.seq_len)
    if data.max_token_id >= cfg.model.vocab_size:
        raise DataError(f"{data_dir}: token id {data.max_token_id} is outside model.vocab_size="
                        f"{cfg.model.vocab_size}")

    if done is not None:
        if done["workload_hash"] != workload_hash(workload_of(cfg, data)):
            raise SetupError(f"run directory {run_dir} holds a complete run of another workload "
                             f"({done['workload_hash'][:12]}); results of different workloads are never mixed")
        return done

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    split = split_parameters(model.named_parameters(), model.param_roles(), ROLE_GROUP, model.attn_layout())
    optimizer = spec.build(split)
    for group in optimizer.param_groups:  # the schedule scales this peak value at every step
        group["peak_lr"] = group["lr"]
    input_hooks = InputHooks.attach(model, optimizer, split.params("hidden"))

    t = cfg.train
    grad_accum = t.global_batch_size // (t.micro_batch_size * ws)
    tokens_per_step = t.global_batch_size * t.seq_len
    workload = workload_of(cfg, data)
    precision = resolve_precision(t.precision, device)
    return Run(cfg=cfg, resolved=OmegaConf.to_container(dcfg, resolve=True), run_dir=run_dir, device=device,
               precision=precision, compile=device.type == "cuda" if t.compile is None else t.compile,
               data=data, model=model, split=split, optimizer=optimizer, input_hooks=input_hooks, world_size=ws, grad_accum=grad_accum,
               tokens_per_step=tokens_per_step, eval_steps=workload["eval_steps"], workload=workload,
               workload_hash=workload_hash(workload))


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
