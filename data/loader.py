"""Training batches as a pure function of (seed, step, micro, rank), and the fixed validation windows.

Training stream. Each train shard is cut into non-overlapping windows of seq_len + 1 tokens: window k of a
shard covers tokens [k*seq_len, k*seq_len + seq_len + 1), so consecutive windows share one boundary token
(the target of one is the first input of the next) and windows never cross shards. An epoch visits every
window exactly once: the shard order is a permutation drawn from (seed, epoch), and within each shard the
window order is a permutation drawn from (seed, epoch, shard). Global window position p lies in epoch
p // W (W windows per epoch), so epochs roll over seamlessly.

Batch layout. With G = micro_bs * grad_accum * world_size windows per optimizer step, step s reads global
positions [s*G, (s+1)*G). Micro-batch `micro` of rank `rank` reads the micro_bs positions starting at
s*G + (micro * world_size + rank) * micro_bs. So the union over ranks and micro-batches is exactly the
global batch a single process reads (with grad_accum * world_size micro-batches), and resuming at any step
needs no iterator state.

Validation. The first val_tokens tokens of the val shards (concatenated in file order) cut into
val_tokens // seq_len windows of seq_len inputs; window j scores targets at tokens jT+1 .. jT+T, so the val
shards must hold val_tokens + 1 tokens. The same tokens for every run with the same val_tokens and seq_len.

Example:
    .venv/bin/python -c "from data.config import DataConfig; from data.loader import TokenData; \
d = TokenData('data/cache/kjv', DataConfig(), 256); x, y = d.train_batch(0, 0, 16, 1); print(x.shape, d.identity())"
"""

import functools
import glob
import json
import os

import numpy as np
import torch

from data.config import DataConfig
from data.shards import DataError, open_shard


class TokenData:
    def __init__(self, data_dir: str, cfg: DataConfig, seq_len: int):
        cfg.validate()
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.dir, self.cfg, self.seq_len = data_dir, cfg, seq_len
        # Fail before any training starts: no shards, or any shard with a bad header or size.
        self.train_files = self._find(cfg.train_pattern)
        self.val_files = self._find(cfg.val_pattern)
        try:
            self.train = [open_shard(f) for f in self.train_files]
            self.val = [open_shard(f) for f in self.val_files]
        except DataError as e:
            raise DataError(f"{e}; rebuild the data with: {self.prepare_hint()}") from None
        self.meta = self._read_meta()

        # Windows per train shard; a shard shorter than seq_len + 1 tokens contributes none.
        self.windows_per_shard = np.array([max(len(t) - 1, 0) // seq_len for t in self.train])
        self.windows_per_epoch = int(self.windows_per_shard.sum())
        if self.windows_per_epoch == 0:
            raise DataError(f"{self.dir}: no train shard holds seq_len + 1 = {seq_len + 1} tokens; build more "
                            f"training data with: {self.prepare_hint()}")
        # Permutations are rebuilt on demand from (seed, epoch[, shard]); the cache holds a batch's worth
        # (the current epoch and, at a rollover, the next), one int64 array per shard.
        self._shard_order = functools.lru_cache(maxsize=2)(self._make_shard_order)
        self._window_order = functools.lru_cache(maxsize=2 * len(self.train))(self._make_window_order)

        self.num_val_windows = cfg.val_tokens // seq_len
        available = sum(len(t) for t in self.val)
        if self.num_val_windows == 0:
            raise ValueError(f"data.val_tokens: {cfg.val_tokens} is shorter than one window (seq_len {seq_len})")
        if available < cfg.val_tokens + 1:
            raise DataError(f"{self.dir}: data.val_tokens = {cfg.val_tokens} needs {cfg.val_tokens + 1} tokens "
                            f"(the last target) but {cfg.val_pattern} holds only {available}; lower "
                            f"data.val_tokens below {available}{self._or_build(val_tokens=cfg.val_tokens + 1)}")
        # The val set as one flat array: a copy of just the tokens it needs, in their stored dtype.
        need, parts = self.num_val_windows * seq_len + 1, []
        for t in self.val:
            parts.append(np.asarray(t[:need]))
            need -= len(parts[-1])
        self._val = np.concatenate(parts)

    def prepare_hint(self) -> str:
        """The command that builds this directory, for error messages: the one that built it (from its
        meta.json), else the data config's `prepare` (how its YAML builds data.dir: KJV, FineWeb, an HF dataset)."""
        return self._rebuild() or self.cfg.prepare.replace("{dir}", os.path.abspath(self.dir))

    def _rebuild(self, **changes) -> str | None:
        """The command that builds this directory again from its meta.json's arguments, with `changes` to them;
        None without a data.prepare meta.json, or when its arguments lack a changed one (the KJV validation
        split's size is the corpus's, a Hugging Face tokenizer's vocabulary its own)."""
        from data.prepare import rebuild_command  # deferred: only an error message needs it

        try:
            with open(os.path.join(self.dir, "meta.json")) as f:
                args = json.load(f)["args"]
            if not set(changes) <= set(args):
                return None
            return rebuild_command({**args, **changes}, os.path.abspath(self.dir))
        except (OSError, ValueError, KeyError, TypeError):  # no meta.json, or not one that data.prepare wrote
            return None

    def _or_build(self, **changes) -> str:
        command = self._rebuild(**changes)
        return f", or build the data for it with: {command}" if command else ""

    def _find(self, pattern: str) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.dir, pattern)))
        if not files:
            raise DataError(f"{os.path.join(self.dir, pattern)}: no shard matches; build the data with: "
                            f"{self.prepare_hint()}")
        return files

    def _read_meta(self) -> dict | None:
        path = os.path.join(self.dir, "meta.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            meta = json.load(f)
        # Cheap consistency checks (names, counts, vocabulary); hashing every shard would be slow at 10B tokens.
        for key, files, shards in (("train_shards", self.train_files, self.train),
                                   ("val_shards", self.val_files, self.val)):
            found = [(os.path.basename(f), len(t)) for f, t in zip(files, shards)]
            listed = [(r["file"], r["tokens"]) for r in meta[key]]
            if found != listed:
                raise DataError(f"{path}: lists {key} (file, tokens) {listed} but the directory holds {found}; "
                                f"rebuild the data with: {self.prepare_hint()}")
        if meta["tokenizer"]["vocab_size"] != self.cfg.vocab_size:
            raise DataError(f"{path}: tokenizer vocab_size {meta['tokenizer']['vocab_size']} differs from "
                            f"data.vocab_size {self.cfg.vocab_size}; set data.vocab_size="
                            f"{meta['tokenizer']['vocab_size']} for this data"
                            f"{self._or_build(vocab_size=self.cfg.vocab_size)}")
        return meta

    @property
    def unigram_entropy_nats(self) -> float | None:
        return self.meta["unigram_entropy_nats"] if self.meta else None

    @functools.cached_property
    def shard_max_ids(self) -> list[tuple[str, int]]:
        """(file, largest token id) of every shard, scanned (never taken from meta.json, which a modified
        shard would contradict): numpy max over the memory-mapped tokens, about 1 s/GB from disk when not
        cached (FineWeb-10B: 20 GB), instant for the embedded corpus."""
        out = []
        for f, t in zip(self.train_files + self.val_files, self.train + self.val):
            top = -1
            for i in range(0, len(t), 1 << 26):
                top = max(top, int(t[i:i + (1 << 26)].max()))
            out.append((f, top))
        return out

    @property
    def max_token_id(self) -> int:
        return max(top for _, top in self.shard_max_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """DataError naming the first shard that holds a token id the model has no embedding for."""
        for f, top in self.shard_max_ids:
            if top >= vocab_size:
                raise DataError(f"{f}: holds token id {top}, outside model.vocab_size={vocab_size}; a model for "
                                f"this data needs model.vocab_size > {top}, or rebuild the data with: "
                                f"{self.prepare_hint()}")

    @property
    def num_val_tokens(self) -> int:
        """Tokens scored by one pass of val_batches."""
        return self.num_val_windows * self.seq_len

    # ---- training -------------------------------------------------------------------------------------

    def _make_shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices in visiting order, first epoch offset of each). The keys of the two generators
        differ in length after numpy drops trailing zeros, so no (seed, epoch, shard) key repeats another."""
        order = np.random.default_rng([self.cfg.seed, epoch, 0]).permutation(len(self.train))
        starts = np.concatenate([[0], np.cumsum(self.windows_per_shard[order])[:-1]])
        return order, starts

    def _make_window_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch, 1, shard]).permutation(self.windows_per_shard[shard])

    @staticmethod
    def positions(step: int, micro: int, micro_bs: int, grad_accum: int, rank: int = 0,
                  world_size: int = 1) -> np.ndarray:
        """Global window positions of one micro-batch (see the batch layout in the module docstring)."""
        if not (step >= 0 and micro_bs >= 1 and 0 <= micro < grad_accum and 0 <= rank < world_size):
            raise ValueError(f"bad batch coordinates: step={step} micro={micro} micro_bs={micro_bs} "
                             f"grad_accum={grad_accum} rank={rank} world_size={world_size}")
        start = step * micro_bs * grad_accum * world_size + (micro * world_size + rank) * micro_bs
        return np.arange(start, start + micro_bs)

    def windows(self, positions: np.ndarray) -> np.ndarray:
        """Global positions -> (n, 2) array of (train shard index, window index within that shard)."""
        out = np.empty((len(positions), 2), dtype=np.int64)
        for i, p in enumerate(positions):
            epoch, offset = divmod(int(p), self.windows_per_epoch)
            order, starts = self._shard_order(epoch)
            # side="right" - 1: the last shard starting at or before offset (skips shards with no windows).
            j = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[j])
            out[i] = shard, self._window_order(epoch, shard)[offset - starts[j]]
        return out

    def train_batch(self, step: int, micro: int, micro_bs: int, grad_accum: int, rank: int = 0,
                    world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 CPU tensors of shape (micro_bs, seq_len), y = x shifted left by one token."""
        T = self.seq_len
        windows = self.windows(self.positions(step, micro, micro_bs, grad_accum, rank, world_size))
        buf = np.empty((micro_bs, T + 1), dtype=np.int64)
        for row, (shard, k) in zip(buf, windows):
            row[:] = self.train[shard][k * T:k * T + T + 1]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    # ---- validation -----------------------------------------------------------------------------------

    def val_batches(self, batch_size: int):
        """Yield (x, y) over the fixed validation windows in order; the last batch may be smaller."""
        T = self.seq_len
        for first in range(0, self.num_val_windows, batch_size):
            rows = np.arange(first, min(first + batch_size, self.num_val_windows))
            buf = self._val[rows[:, None] * T + np.arange(T + 1)].astype(np.int64)  # (B, T + 1)
            yield torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    # ---- identity -------------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What the workload hash needs to know about the data. From meta.json when present (its sha256s);
        otherwise from file names, sizes and headers only, since hashing 10 GB of shards would take minutes."""
        if self.meta:
            return {"corpus": self.meta["corpus"], "tokenizer_sha256": self.meta["tokenizer"]["sha256"],
                    "train_shards": [r["sha256"] for r in self.meta["train_shards"]],
                    "val_shards": [r["sha256"] for r in self.meta["val_shards"]],
                    "val_tokens": self.cfg.val_tokens}

        def describe(files, shards):
            return [{"file": os.path.basename(f), "bytes": os.path.getsize(f), "tokens": len(t),
                     "dtype": str(t.dtype)} for f, t in zip(files, shards)]

        return {"corpus": self.cfg.name, "train_shards": describe(self.train_files, self.train),
                "val_shards": describe(self.val_files, self.val), "val_tokens": self.cfg.val_tokens}
