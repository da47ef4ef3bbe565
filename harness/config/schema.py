"""Typed configuration: the schema every run is checked against before any compute.

Hydra composes conf/config.yaml with the groups model/, optimizer/, data/, schedule/, experiment/; the
result is merged into the `Config` dataclass below (registered in Hydra's ConfigStore as `base_config`),
so an unknown key or a wrong type fails at composition with the dotted key in the message
(harness/config/validate.py then checks values and cross-field constraints).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from harness.loop.schedule import ScheduleConfig
from harness.probes.diagnostics import DiagnosticsConfig
from models.config import ModelConfig
from optimizers.hybrid import SharedGroup


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class TrainConfig:
    max_steps: int = 300  # optimizer updates (the step budget of the workload)
    seq_len: int = 256  # tokens per sequence; <= model.block_size
    global_batch_size: int = 16  # sequences per update, over accumulation and processes
    micro_batch_size: int = 16  # sequences per forward/backward on one process
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    eval_every: int = 50
    eval_dense_every: int = 10  # evaluation interval in the last eval_dense_frac of the budget
    eval_dense_frac: float = 0.2
    eval_batch_size: int = 16
    target_loss: float | None = None  # validation loss defining steps/tokens/time to target
    device: str = "auto"  # auto (cuda if present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA; on a CPU timed: harness/lifecycle/precision.py) | fp32 | bf16
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off on CPU
    log_every: int = 1  # steps between metrics lines
    progress: bool = True  # tqdm progress bar
    save_final: bool = True  # write model_final.pt (for scripts/export_hf.py)
    # With several processes: ddp (replicated model, gradients all-reduced) or fsdp (FSDP2 fully_shard of every
    # block and the root: parameters, gradients and AdamW state sharded; see runtime/distributed.py for limits)
    parallel: str = "ddp"
    threads: int = 0  # torch intra-op threads; 0 = torch's default (benchmarks running jobs in parallel set 1)
    # What a launch does with what it finds or meets (harness/lifecycle/rundir.py; scripts/bench.py sets the
    # second value of each, so that re-running a benchmark runs only what is missing):
    on_complete: str = "refuse"  # a complete record of the same workload in the run directory: refuse | skip
    # an incomplete record without a checkpoint, or a checkpoint that cannot be read: refuse | move_aside (to
    # <dir>.broken-<time>, kept, and the run starts afresh)
    on_broken: str = "refuse"
    on_crash: str = "raise"  # an exception in the loop: raise | record (a failed run, counted as diverged)
    # A training loss above diverge_factor x the step-0 validation loss (or a non-finite one) ends the run as
    # diverged (docs/protocol.md: blown-up runs count as diverged, steps to target infinite).
    diverge_factor: float = 1.5
    # ... for this many consecutive steps (a non-finite loss ends the run at once)
    diverge_patience: int = 5
    # Checkpoints (harness/lifecycle/checkpoint.py): every ckpt_every steps (0 = none) into RUN_DIR/checkpoints/, the newest
    # ckpt_keep kept; deleted once the run's records are complete unless ckpt_keep_final. With resume, launching
    # on a run directory that holds checkpoints but no summary.json continues from the newest, bit-exactly.
    ckpt_every: int = 100
    ckpt_keep: int = 2
    ckpt_keep_final: bool = False
    resume: bool = True
    # Extra checkpoints after exactly these steps (the state after s updates), never rotated away by ckpt_keep
    # nor deleted when the run completes: the starting points of cooldown branches (below).
    ckpt_steps: list[int] = field(default_factory=list)
    # Cooldown branch (protocol v2: end-of-schedule losses at budgets B1 < B2 < ... from one long WSD run): start
    # this run, in a new run directory, from the checkpoint after branch_step steps of the run directory
    # branch_from (launched with train.ckpt_steps=[branch_step]), as a resume would, with this run's max_steps.
    # Its metrics.jsonl begins with the parent's records up to branch_step, its clocks include the parent's time;
    # summary.json and env.json record "branch". Refused before any compute unless the parent's config equals this
    # one in everything but max_steps, ckpt_*, branch_*, progress, logger (wandb.*), name and bench.phase/trial
    # (harness/lifecycle/branch.py BRANCH_KEYS), and both lr schedules
    # agree on every step < branch_step: use schedule=wsd with a fixed schedule.warmup_steps and branch_step =
    # B - round(schedule.decay_frac * B) for budget B. Example (parent: 40 steps, branch to 20 from step 16):
    #   python train.py schedule=wsd schedule.warmup_steps=2 train.max_steps=40 'train.ckpt_steps=[16]' hydra.run.dir=P
    #   python train.py schedule=wsd schedule.warmup_steps=2 train.max_steps=20 train.branch_from=P \
    #       train.branch_step=16 hydra.run.dir=P_b20
    branch_from: str | None = None
    branch_step: int = 0


@dataclass
class WandbConfig:
    enabled: bool = False  # conf/logger/wandb.yaml turns it on, conf/logger/none.yaml off
    project: str = "optbench"
    entity: str | None = None
    # auto: online when an API key is configured (WANDB_API_KEY or a netrc entry), else offline at once,
    # without waiting on the network; `wandb sync <run_dir>/wandb/offline-run-*` uploads later.
    mode: str = "auto"  # auto | online | offline
    group: str | None = None  # default: the benchmark name (bench.name), else the experiment
    job_type: str | None = None  # default: the benchmark arm (bench.arm), else the optimizer
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0  # seconds W&B may take to start before the run goes on without it


@dataclass
class BenchTag:
    """Where a run sits in a benchmark (scripts/bench.py writes these); empty for a standalone run."""

    name: str | None = None  # the benchmark (conf/bench/<name>.yaml)
    arm: str | None = None  # the compared method: an optimizer plus method options (e.g. adamw_pc)
    phase: str | None = None  # tune | cert | seed | branch | diag (bench/plan.py)
    trial: str | None = None  # the setting's id within the arm's grid (e.g. "optimizer.lr=0.003")


@dataclass
class Config:
    model: ModelConfig = MISSING  # a built-in family, or a user's class by model._target_ (models/__init__.py)
    data: DataConfig = MISSING
    optimizer: Any = MISSING  # typed by its own `_target_` spec dataclass, see build_optimizer_spec
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    bench: BenchTag = field(default_factory=BenchTag)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)  # harness/probes/diagnostics.py
    # Protocol v2's shared group (optimizers/hybrid.py): one AdamW for embeddings, head and gains/biases in every
    # arm, replacing each optimizer's own `aux`; the optimizer under test keeps only the hidden matrices. Enabled
    # by every benchmark (conf/bench/*.yaml `hybrid:`); off (default) = each optimizer as its config declares.
    hybrid: SharedGroup = field(default_factory=SharedGroup)
    seed: int = 0  # model-initialisation seed; the data order has its own data.seed
    name: str = "run"  # free-form label, used in the default run directory
    experiment: str | None = None  # set by conf/experiment/*.yaml to its own name


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def to_typed(dcfg: DictConfig) -> Config:
    """The composed config as a `Config` object; a type or key problem is a one-line ConfigError. The schema is
    closed: a key Hydra let in with `+` (`+train.max_stepz=10`) that no field declares is refused too."""
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None
    problem = unknown_key(cfg)
    if problem:
        raise ConfigError(problem)
    return cfg


def unknown_key(obj: Any, prefix: str = "") -> str | None:
    """The first attribute of a config dataclass (or of one nested in it) that is not one of its fields, as a
    one-line problem with the closest field's name; None when every key is declared."""
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in vars(obj).items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            return f"{prefix}{key}: not a key of {type(obj).__name__}; nothing would read it{hint}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            problem = unknown_key(value, f"{prefix}{key}.")
            if problem:
                return problem
    return None
