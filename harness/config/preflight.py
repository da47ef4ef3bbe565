"""One-line errors for what Hydra itself would reject in several lines or with a traceback.

`python train.py ...` composes its overrides here first (Hydra's compose API, the same config tree), so an
unknown key, an unknown group option, a value of the wrong type or an unparsable override prints

    error: train.max_stepz: Key 'max_stepz' not in 'TrainConfig' (did you mean train.max_steps?)
    error: optimizer=adamz: no conf/optimizer/adamz.yaml (options: adam_mini, adamw, lion, ...)

and exits 2 before Hydra creates any directory. A run directory that cannot be created (under a regular
file, on a read-only mount) is reported the same way; Hydra would create it with a traceback. Hydra's own
flags (-m, --cfg, --help, ...) skip this and keep Hydra's behaviour. The user's config directories
(OPTBENCH_CONFIG_PATH, harness/config/search.py) are composed with conf/; a wrong entry in that variable is
one line too, flags or not.

config_error() checks a command line as train.py would without running it: these checks, then the typed
config's validation (schema.py, validate.py), which train.py itself does once the run is prepared; the GPU
check's dry run (scripts/gpu_check.py --dry-run) composes every planned train.py command with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.utils import get_class
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from harness.config import search
from harness.config.schema import ConfigError, register_configs, to_typed
from harness.config.validate import optimizer_keys, validate


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)


def schema_fields(path: str) -> list[str]:
    """The field names of the config dataclass at the dotted `path` of `Config` ("" = the root; [] where the
    path leads to no dataclass, e.g. under `optimizer`, which its own spec types)."""
    from harness.config.schema import Config

    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        node = hints.get(part)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def composition_error(config_dir: Path, overrides: list[str]) -> tuple[str | None, str | None]:
    """(error line, run directory) for these overrides, the user's config directories on the search path;
    error None when they compose."""
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
            cfg = compose("config", overrides=search.with_user_dirs(overrides), return_hydra_config=True)
            try:
                run_dir = str(cfg.hydra.run.dir)
            except OmegaConfBaseException:
                run_dir = None
    except MissingConfigException as e:
        group, _, name = (e.missing_cfg_file or "").rpartition("/")
        options = f" (options: {', '.join(e.options)})" if e.options else ""
        where = f"{group}={name}: no {search.where(group, name)}" if group else _first_line(e)
        return where + options, None
    except ConfigError as e:  # OPTBENCH_CONFIG_PATH
        return str(e), None
    except OverrideParseException as e:
        return f"cannot parse the override {getattr(e, 'override', None) or ''!r}: {_first_line(e)}", None
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
        key = getattr(cause, "full_key", None)
        text = _first_line(cause)
        if key and "not in" in text:  # the schema is closed: say which key was meant
            parent, _, name = key.rpartition(".")
            if key.startswith("optimizer."):  # typed by its `_target_`, not by Config
                return f"{key}: {text}{optimizer_key_hint(config_dir, overrides, key)}", None
            close = difflib.get_close_matches(name, schema_fields(parent), n=1)
            hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
            return f"{key}: {text}{hint}", None
        return (f"{key}: {text}" if key else f"{_first_line(e)}: {text}" if cause is not e else text), None
    return None, run_dir


def optimizer_key_hint(config_dir: Path, overrides: list[str], key: str) -> str:
    """What to say after `optimizer.<...>: Key ... is not in struct` (an override of a key the optimizer's YAML
    does not set): the closest key its `_target_` accepts (harness/config/validate.py optimizer_keys), or, for an
    argument an external optimizer's class takes, the `+` that adds it. "" when the rest does not compose."""
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
            target = compose("config", overrides=search.with_user_dirs(rest)).optimizer._target_
        spec_cls = get_class(target)
    except Exception:  # noqa: BLE001 - no hint then; the error line itself stands
        return ""
    parent, _, name = key.removeprefix("optimizer.").rpartition(".")
    names = optimizer_keys(spec_cls, parent)
    if name in names:
        return f" (the YAML does not set it; {target} takes it: add it with +{key}=VALUE)"
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean optimizer.{parent + '.' if parent else ''}{close[0]}?)" if close else ""


def run_dir_error(run_dir: str) -> str | None:
    """Why `run_dir` cannot be created (nothing is created or left behind by the check)."""
    path = Path(run_dir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if path.exists() and not path.is_dir():
        return f"hydra.run.dir: {path} exists and is not a directory"
    if not probe.is_dir():
        return f"hydra.run.dir: cannot create {path}: {probe} is a file, not a directory"
    if probe == path:
        return None  # exists: its writability is checked with the run's other records (harness/lifecycle/prepare.py)
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".optbench-probe-"))
    except OSError as e:
        return f"hydra.run.dir: cannot create {path} under {probe} ({e.strerror})"
    return None


def preflight(config_dir: Path, argv: list[str]) -> str | None:
    """The one-line error for `train.py argv`, or None to let Hydra run it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        multirun = any(a in ("-m", "--multirun") for a in argv)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        if not any(a.startswith(f"{key}=") for a in argv):
            return (f"{key}: a multi-process run needs an explicit {key}=PATH (every rank must write to the same "
                    "directory; the default has the launch time in its name)")
    try:
        search.user_dirs()  # checked here too for Hydra's own flags (-m, ...), which skip the composition
    except ConfigError as e:
        return str(e)
    if any(a.startswith("-") for a in argv):
        return None
    error, run_dir = composition_error(config_dir, argv)
    if error is None and run_dir:
        error = run_dir_error(run_dir)
    return error


def config_error(config_dir: Path, overrides: list[str]) -> str | None:
    """train.py's own checks of `overrides` without running it: the one-line composition error (and run
    directory check), then the typed config's validation (schema.py, validate.py), all before any compute."""
    register_configs()
    error, run_dir = composition_error(config_dir, overrides)
    if error is None and run_dir:
        error = run_dir_error(run_dir)
    if error is not None:
        return error
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
            cfg = compose("config", overrides=search.with_user_dirs(overrides), return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)  # ${hydra:...} in `name` resolves as under @hydra.main
            with open_dict(cfg):
                del cfg["hydra"]
            validate(to_typed(cfg))
    except ConfigError as e:
        return str(e)
    return None
