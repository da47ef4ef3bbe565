"""Typed configuration: the schema every run is checked against before any compute.

Hydra composes conf/config.yaml with the groups model/, optimizer/, data/, schedule/, experiment/; the
result is merged into the `Config` dataclass below (registered in Hydra's ConfigStore as `base_config`),
so an unknown key or a wrong type fails at composition with the dotted key in the message. `validate()`
then checks values and cross-field constraints (batch divisibility, context length, vocabulary) and
builds the optimizer's own typed spec from its `_target_`.

    python train.py train.max_steps=0        # -> error: train.max_steps: must be > 0 (got 0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig
from harness.diagnostics import DiagnosticsConfig
from harness.schedule import SCHEDULES, ScheduleConfig  # ScheduleConfig is defined there, re-exported here
from models.config import ModelConfig
from optimizers.hybrid import SharedGroup
from runtime.distributed import world_size


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
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off on CPU
    log_every: int = 1  # steps between metrics lines
    progress: bool = True  # tqdm progress bar
    save_final: bool = True  # write model_final.pt (for scripts/export_hf.py)
    # With several processes: ddp (replicated model, gradients all-reduced) or fsdp (FSDP2 fully_shard of every
    # block and the root: parameters, gradients and AdamW state sharded; see runtime/distributed.py for limits)
    parallel: str = "ddp"
    threads: int = 0  # torch intra-op threads; 0 = torch's default (benchmarks running jobs in parallel set 1)
    # A run directory that already holds a complete run of the same workload is skipped (its summary is kept),
    # one holding an incomplete run is moved aside to <dir>.broken-<time> and rerun. Off: such a directory is
    # refused. Benchmarks turn it on so that re-running a benchmark only runs what is missing.
    skip_complete: bool = False
    # A training loss above diverge_factor x the step-0 validation loss (or a non-finite one) ends the run as
    # diverged (protocol.md: blown-up runs count as diverged, steps to target infinite).
    diverge_factor: float = 1.5
    # ... for this many consecutive steps (a non-finite loss ends the run at once)
    diverge_patience: int = 5
    # Checkpoints (harness/checkpoint.py): every ckpt_every steps (0 = none) into RUN_DIR/checkpoints/, the newest
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
    # (harness/branch.py BRANCH_KEYS), and both lr schedules
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
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    optimizer: Any = MISSING  # typed by its own `_target_` spec dataclass, see build_optimizer_spec
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    bench: BenchTag = field(default_factory=BenchTag)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)  # harness/diagnostics.py
    # Protocol v2's shared group (optimizers/hybrid.py): one AdamW for embeddings, head and gains/biases in every
    # arm, replacing each optimizer's own `aux`; the optimizer under test keeps only the hidden matrices. Enabled
    # by every benchmark (conf/bench/*.yaml `hybrid:`); off (default) = each optimizer as its config declares.
    hybrid: SharedGroup = field(default_factory=SharedGroup)
    seed: int = 0  # model-initialisation seed; the data order has its own data.seed
    name: str = "run"  # free-form label, used in the default run directory
    experiment: str | None = None  # set by conf/experiment/*.yaml to its own name


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)


def _positive(key: str, value: float, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}: must be {'>' if strict else '>='} 0 (got {value})")


def build_optimizer_spec(node: DictConfig | dict) -> Any:
    """Turn the `optimizer` node into its typed spec (a dataclass named by `_target_`, with a
    `validate(key)` method for ranges and a `build(split)` method), checking keys, types and ranges.
    Errors name the key as `optimizer.<key>`."""
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = node.pop("_target_", None)
    if not target:
        raise ConfigError("optimizer._target_: missing (each conf/optimizer/*.yaml names its spec class)")
    try:
        spec_cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - hydra wraps import errors in several types
        raise ConfigError(f"optimizer._target_: cannot import {target!r} ({e.__class__.__name__})") from None
    if not dataclasses.is_dataclass(spec_cls):
        raise ConfigError(f"optimizer._target_: {target} is not a dataclass spec")
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec_cls), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"optimizer.{key}: {str(e).splitlines()[0]}") from None
    try:
        spec.validate("optimizer")  # range checks; messages start with the dotted key
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return spec


def validate(cfg: Config) -> Any:
    """Check values and cross-field constraints; return the optimizer spec. Raises ConfigError."""
    for section in (cfg.model, cfg.data):
        try:
            section.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    t, s = cfg.train, cfg.schedule
    for key in ("max_steps", "seq_len", "global_batch_size", "micro_batch_size", "eval_every",
                "eval_dense_every", "eval_batch_size", "log_every"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.grad_clip", t.grad_clip, strict=False)
    if not 0.0 <= t.eval_dense_frac <= 1.0:
        raise ConfigError(f"train.eval_dense_frac: must be in [0, 1] (got {t.eval_dense_frac})")
    if t.target_loss is not None:
        _positive("train.target_loss", t.target_loss)
    if t.seq_len > cfg.model.block_size:
        raise ConfigError(f"train.seq_len: {t.seq_len} exceeds the model's context model.block_size="
                          f"{cfg.model.block_size}")
    ws = world_size()
    if t.global_batch_size % (t.micro_batch_size * ws):
        raise ConfigError(f"train.global_batch_size: {t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size x world size = {t.micro_batch_size} x {ws}")
    if cfg.data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"data.vocab_size: the tokenizer's {cfg.data.vocab_size} tokens exceed "
                          f"model.vocab_size={cfg.model.vocab_size}")
    if t.device != "auto" and t.device != "cpu" and not t.device.startswith("cuda"):
        raise ConfigError(f"train.device: {t.device!r} is not auto, cpu, cuda or cuda:N")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: {t.precision!r} is not auto, fp32 or bf16")
    if s.name not in SCHEDULES:
        raise ConfigError(f"schedule.name: {s.name!r} is not one of {', '.join(SCHEDULES)}")
    if not 0.0 <= s.warmup_frac < 1.0:
        raise ConfigError(f"schedule.warmup_frac: must be in [0, 1) (got {s.warmup_frac})")
    if s.warmup_steps is not None and not 0 <= s.warmup_steps < t.max_steps:
        raise ConfigError(f"schedule.warmup_steps: must be in [0, train.max_steps={t.max_steps}) (got {s.warmup_steps})")
    if not 0.0 <= s.min_lr_frac <= 1.0:
        raise ConfigError(f"schedule.min_lr_frac: must be in [0, 1] (got {s.min_lr_frac})")
    if not 0.0 < s.decay_frac <= 1.0:
        raise ConfigError(f"schedule.decay_frac: must be in (0, 1] (got {s.decay_frac})")
    _positive("wandb.init_timeout", cfg.wandb.init_timeout)
    if cfg.wandb.mode not in ("auto", "online", "offline"):
        raise ConfigError(f"wandb.mode: {cfg.wandb.mode!r} is not auto, online or offline")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel: {t.parallel!r} is not ddp or fsdp")
    if t.threads < 0:
        raise ConfigError(f"train.threads: must be >= 0 (got {t.threads})")
    if t.diverge_patience < 1:
        raise ConfigError(f"train.diverge_patience: must be >= 1 (got {t.diverge_patience})")
    _positive("train.ckpt_every", t.ckpt_every, strict=False)
    _positive("train.ckpt_keep", t.ckpt_keep)
    for step in t.ckpt_steps:
        if not 0 < step < t.max_steps:
            raise ConfigError(f"train.ckpt_steps: {step} is not in (0, train.max_steps={t.max_steps})")
    if t.branch_from is None and t.branch_step:
        raise ConfigError(f"train.branch_step: {t.branch_step} without train.branch_from (the run to branch from)")
    if t.branch_from is not None and not 0 < t.branch_step < t.max_steps:
        raise ConfigError(f"train.branch_step: must be in (0, train.max_steps={t.max_steps}) (got {t.branch_step}); a "
                          "branch continues its parent after branch_step steps and ends at its own max_steps")
    if not t.diverge_factor > 1.0:
        raise ConfigError(f"train.diverge_factor: must be > 1 (got {t.diverge_factor})")
    d = cfg.diagnostics
    try:
        d.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.every and d.noise and t.global_batch_size == t.micro_batch_size * ws and t.micro_batch_size % d.noise_pieces:
        raise ConfigError(f"diagnostics.noise_pieces: the step's single micro-batch of {t.micro_batch_size} sequences "
                          f"cannot be cut into {d.noise_pieces} equal pieces for the gradient-noise estimate; pick a "
                          "divisor (or diagnostics.noise=false)")
    if cfg.hybrid.enabled:
        try:
            cfg.hybrid.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.bench.phase not in (None, "tune", "cert", "seed", "branch", "diag"):
        raise ConfigError(f"bench.phase: {cfg.bench.phase!r} is not tune, cert, seed, branch or diag")
    return build_optimizer_spec(cfg.optimizer)
