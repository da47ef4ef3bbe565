"""Value and cross-field checks of a composed config, and the optimizer's typed spec from its `_target_`.

    python train.py train.max_steps=0        # -> error: train.max_steps: must be > 0 (got 0)
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.config.schema import Config, ConfigError
from harness.loop.schedule import SCHEDULES
from optimizers.adamw import AdamWSpec
from optimizers.external import RESERVED, ExternalSpec, arguments, is_external
from optimizers.hparams import non_finite
from runtime.distributed import world_size

# train.on_*: the first value is a standalone run's (refuse, raise), the second a benchmark's
POLICIES = {"on_complete": ("refuse", "skip"), "on_broken": ("refuse", "move_aside"), "on_crash": ("raise", "record")}


def _positive(key: str, value: float, strict: bool = True) -> None:
    if value is None or (value <= 0 if strict else value < 0):
        raise ConfigError(f"{key}: must be {'>' if strict else '>='} 0 (got {value})")


def build_optimizer_spec(node: DictConfig | dict) -> Any:
    """Turn the `optimizer` node into its typed spec: the dataclass `_target_` names (a `validate(key)` method for
    ranges, a `build(split)` method), or for a torch.optim.Optimizer subclass an ExternalSpec of its keyword
    arguments (optimizers/external.py), checking keys, types and ranges. Errors name the key as `optimizer.<key>`,
    an unknown one with the closest known."""
    node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = node.pop("_target_", None)
    if not target:
        raise ConfigError("optimizer._target_: missing (each conf/optimizer/*.yaml names its spec class)")
    try:
        spec_cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - hydra wraps import errors in several types
        raise ConfigError(f"optimizer._target_: cannot import {target!r} ({e.__class__.__name__})") from None
    if not dataclasses.is_dataclass(spec_cls) and not is_external(spec_cls):
        raise ConfigError(f"optimizer._target_: {target} is neither a dataclass spec nor a torch.optim.Optimizer")
    try:
        spec = (ExternalSpec.from_node(target, node) if is_external(spec_cls)
                else OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec_cls), node)))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, optimizer_keys(spec_cls, parent), n=1) if "not in" in str(e) else []
        hint = f" (did you mean optimizer.{parent + '.' if parent else ''}{close[0]}?)" if close else ""
        raise ConfigError(f"optimizer.{key}: {str(e).splitlines()[0]}{hint}") from None
    except ValueError as e:  # ExternalSpec.from_node: a reserved key
        raise ConfigError(str(e)) from None
    try:
        spec.validate("optimizer")  # range checks; messages start with the dotted key
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return spec


def optimizer_keys(spec_cls: Any, path: str = "") -> list[str]:
    """The keys an optimizer node whose `_target_` is `spec_cls` accepts at the dotted `path` below it ("" = its
    top): a spec dataclass's fields (a nested spec's at its path), an external optimizer's keyword arguments and
    reserved keys (its `_aux_`: AdamW's fields). [] where nothing is known."""
    if is_external(spec_cls):
        if not path:
            return [*arguments(spec_cls), *RESERVED]
        head, _, path = path.partition(".")
        spec_cls = AdamWSpec if head == "_aux_" else None
    node = spec_cls
    for part in [p for p in path.split(".") if p]:
        node = typing.get_type_hints(node).get(part) if dataclasses.is_dataclass(node) else None
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def validate(cfg: Config) -> Any:
    """Check values and cross-field constraints; return the optimizer spec. Raises ConfigError."""
    bad = non_finite(cfg)
    if bad:
        raise ConfigError(f"{bad[0]}: must be a finite number (got {bad[1]})")
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
    for key, values in POLICIES.items():
        if getattr(t, key) not in values:
            raise ConfigError(f"train.{key}: {getattr(t, key)!r} is not {' or '.join(values)}")
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
