"""Where configs are found: the repository's conf/ first, then the user's own directories.

A user keeps configs and code outside the repository in directories laid out like conf/ (optimizer/, model/,
experiment/, bench/, data/, schedule/, ...) and names them in OPTBENCH_CONFIG_PATH (os.pathsep-separated, like
PATH). Every entry point composes with them (train.py, scripts/bench.py, scripts/perf.py,
scripts/gpu_check.py, the preflight) and lists their options next to the repository's:

    OPTBENCH_CONFIG_PATH=~/optbench_conf python train.py experiment=smoke optimizer=mysgd model=tiny_mlp
    OPTBENCH_CONFIG_PATH=~/optbench_conf python scripts/bench.py my_bench --dry-run

    ~/optbench_conf/optimizer/mysgd.yaml     _target_: my_optimizers.MySGDSpec
    ~/optbench_conf/model/tiny_mlp.yaml      _target_: my_models.TinyMLP   (models/__init__.py: the interface)
    ~/optbench_conf/my_optimizers.py         importable: each directory itself is appended to sys.path

Rules: a missing entry is a one-line error; a config name means one file, so a YAML at the same relative path
as one of conf/ (or of an earlier directory) is an error, not a silent override; each directory (not its
parent) is appended to sys.path, after everything else, so the repository's packages and installed ones keep
their names (pick distinctive module names). Hydra's own `hydra.searchpath=[...]` on train.py's command line
still works: these directories join that same list (with_user_dirs), after its entries.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.config.schema import ConfigError

ENV = "OPTBENCH_CONFIG_PATH"
CONF = Path(__file__).resolve().parents[2] / "conf"
_SEARCHPATH = "hydra.searchpath"
_PLAIN = re.compile(r"[\w/.:~+@%-]+")  # a search-path entry Hydra's override grammar reads without quotes


def user_dirs() -> list[Path]:
    """The directories of OPTBENCH_CONFIG_PATH, absolute, in order (empty entries and repeats skipped).
    Raises ConfigError for an entry that is not a directory, or a YAML that two directories both hold."""
    dirs: list[Path] = []
    for entry in os.environ.get(ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ConfigError(f"{ENV}: {entry} {what} (a list of config directories laid out like conf/, "
                              f"separated by {os.pathsep!r})")
        if path != CONF and path not in dirs:
            dirs.append(path)
    if not dirs:
        return dirs
    owner: dict[Path, Path] = {}
    for d in [CONF, *dirs]:
        for yaml in sorted(d.rglob("*.yaml")):
            rel = yaml.relative_to(d)
            if rel in owner:
                raise ConfigError(f"{ENV}: {yaml} has the name of {owner[rel] / rel}: a config name means one "
                                  "file across conf/ and the user's directories; rename yours")
            owner[rel] = d
    return dirs


def config_dirs() -> list[Path]:
    """Every config directory, the repository's conf/ first."""
    return [CONF, *user_dirs()]


def find(group: str, name: str) -> Path | None:
    """The YAML of option `name` of `group` (e.g. "optimizer", "mysgd"), wherever it is; None if nowhere."""
    return next((p for d in config_dirs() if (p := d / group / f"{name}.yaml").is_file()), None)


def options(group: str) -> list[str]:
    """The names of every option of `group` across all config directories, sorted."""
    return sorted({p.stem for d in config_dirs() for p in (d / group).glob("*.yaml")})


def where(group: str, name: str) -> str:
    """How a missing option is described: its path under conf/, and the user's directories when set."""
    users = f" nor {group}/{name}.yaml under {ENV}" if os.environ.get(ENV) else ""
    return f"conf/{group}/{name}.yaml{users}"


def activate() -> list[Path]:
    """Put the user's directories to use in this process and the ones it starts: each appended once to
    sys.path (so a YAML's `_target_` imports code kept next to it), and OPTBENCH_CONFIG_PATH rewritten with
    absolute paths (so a subprocess started from another directory, e.g. bench's multirun, sees the same)."""
    dirs = user_dirs()
    for d in dirs:
        if str(d) not in sys.path:
            sys.path.append(str(d))
            importlib.invalidate_caches()
    if dirs:
        os.environ[ENV] = os.pathsep.join(map(str, dirs))
    return dirs


def with_user_dirs(overrides: Sequence[str]) -> list[str]:
    """`overrides` (a command line's arguments) with the user's directories on Hydra's search path (`file://`
    URLs), activated: joined to the one `hydra.searchpath=[...]` already there (Hydra reads only the first),
    else a new one inserted before the first override (Hydra's parser wants the overrides together, e.g. after
    `-m`) or, with none, first (no flag such as `--info` can take it as its value). Unchanged without user
    directories."""
    urls = [f"file://{d}" for d in activate()]
    if not urls:
        return list(overrides)
    out, merged = list(overrides), False
    for i, o in enumerate(out):
        if o.split("=", 1)[0].lstrip("+~") == _SEARCHPATH:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            given = OverridesParser.create().parse_override(o).value()
            given = [given] if isinstance(given, str) else list(given or [])
            out[i] = _searchpath([*given, *(u for u in urls if u not in given)])
            merged = True
            break
    if not merged:
        first = (i for i, o in enumerate(out) if not o.startswith("-") and ("=" in o or o.startswith("~")))
        out.insert(next(first, 0), _searchpath(urls))
    return out


def _searchpath(entries: Sequence[str]) -> str:
    def quoted(e: str) -> str:
        return e if _PLAIN.fullmatch(e) else "'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return f"{_SEARCHPATH}=[{','.join(map(quoted, entries))}]"
