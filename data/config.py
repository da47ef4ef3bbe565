"""The data config schema (conf/data/*.yaml): where the shards are and how the training stream is read.

A structured config: Hydra/OmegaConf type-check the YAML against these fields, validate() checks values.

Example:
    .venv/bin/python -c "from omegaconf import OmegaConf; from data.config import DataConfig; \
c = OmegaConf.to_object(OmegaConf.merge(DataConfig, OmegaConf.load('conf/data/kjv.yaml'))); c.validate(); print(c)"
"""

from dataclasses import dataclass


@dataclass
class DataConfig:
    name: str = "kjv"
    dir: str = "data/cache/kjv"  # a relative path is relative to the repository root
    train_pattern: str = "train_*.bin"  # glob inside dir; shards are read in sorted file-name order
    val_pattern: str = "val_*.bin"
    vocab_size: int = 4096  # the tokenizer's vocabulary size (the model's embedding rows)
    # The fixed validation set: the first val_tokens tokens of the val shards (in file order), cut into
    # windows of seq_len; the val shards must hold val_tokens + 1 tokens (the last window's target).
    # KJV at vocab 4096 has 51,051 val tokens (48,132 at vocab 8192), so 49,152 = 48 x 1024.
    val_tokens: int = 49152
    seed: int = 0  # data-order seed (which window comes when); separate from the model-init seed
    prepare: str = "python -m data.prepare kjv --out data/cache/kjv --vocab-size 4096"  # builds dir

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
