"""The data config schema (conf/data/*.yaml): where the shards are and how the training stream is read.

A structured config: Hydra/OmegaConf type-check the YAML against these fields, validate() checks values.
`data.dir` is a path like any on the command line: a relative one is relative to the directory the run is
launched from. The shipped configs name their cache inside this repository with the `${repo:...}` resolver
registered here (`dir: ${repo:data/cache/kjv}`), so the defaults work from any working directory.

Example:
    .venv/bin/python -c "from omegaconf import OmegaConf; from data.config import DataConfig; \
c = OmegaConf.to_object(OmegaConf.merge(DataConfig, OmegaConf.load('conf/data/kjv.yaml'))); c.validate(); print(c)"
"""

import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
KJV_DIR = str(REPO / "data" / "cache" / "kjv")  # where `make data` puts the default corpus


def repo_path(relative: str) -> str:
    """`${repo:data/cache/kjv}` in a config: that path inside this repository, absolute."""
    return str(REPO / relative)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", repo_path)


# At import: every reader of conf/data/*.yaml (Hydra's composition via harness/config/schema.py, a plain
# OmegaConf.merge with DataConfig) imports this schema first.
register_resolvers()


def launch_dir() -> str:
    """The directory the user launched from: inside a Hydra job, Hydra's original working directory (the run
    directory is the current one under hydra.job.chdir=true), else the current one."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


@dataclass
class DataConfig:
    name: str = "kjv"
    dir: str = KJV_DIR  # a relative path is relative to the launch directory (resolve_dir)
    train_pattern: str = "train_*.bin"  # glob inside dir; shards are read in sorted file-name order
    val_pattern: str = "val_*.bin"
    vocab_size: int = 4096  # the tokenizer's vocabulary size (the model's embedding rows)
    # The fixed validation set: the first val_tokens tokens of the val shards (in file order), cut into
    # windows of seq_len; the val shards must hold val_tokens + 1 tokens (the last window's target).
    # KJV at vocab 4096 has 51,051 val tokens (48,132 at vocab 8192), so 49,152 = 48 x 1024.
    val_tokens: int = 49152
    seed: int = 0  # data-order seed (which window comes when); separate from the model-init seed
    # The command that builds dir, named by the loader's errors when dir holds no meta.json to rebuild from.
    # "{dir}" in it stands for the directory, absolute (the command runs from the repository root).
    prepare: str = "python -m data.prepare kjv --out {dir} --vocab-size 4096"

    def validate(self) -> None:
        for key in ("name", "dir", "train_pattern", "val_pattern", "prepare"):
            if not getattr(self, key):
                raise ValueError(f"data.{key}: must not be empty")
        if self.vocab_size < 2:
            raise ValueError(f"data.vocab_size: must be at least 2, got {self.vocab_size}")
        if self.val_tokens < 1:
            raise ValueError(f"data.val_tokens: must be positive, got {self.val_tokens}")
        if self.seed < 0:
            raise ValueError(f"data.seed: must be non-negative (a numpy SeedSequence entropy), got {self.seed}")

    def resolve_dir(self) -> str:
        """`dir` as an absolute path; a relative one is taken from the launch directory, as users expect."""
        return os.path.abspath(os.path.join(launch_dir(), os.path.expanduser(self.dir)))
