"""Sanity baselines (protocol v2): validation cross-entropy of unigram, bigram and trigram models.

Counted on the concatenated training shards (in TokenData's file order; counting across document and shard
boundaries is fine at this precision) and scored on exactly the validation windows the language models are
evaluated on (TokenData.val_batches). Each target w[t+1] of a window w (inputs w[:-1], targets w[1:]) is
predicted from earlier tokens of the SAME window only, as the model sees no context across windows: the
bigram from w[t], the trigram from (w[t-1], w[t]); at the window start (t = 0) the trigram has one token of
context and uses the bigram model's P_KN(w | w[0]) (so both agree there). Values are mean nats per token.

With V the vocabulary, D the absolute discount (0 < D <= 1), c(.) training counts, c(h .) = sum_w c(h w),
N1+(h .) = #{w : c(h w) > 0}, N1+(. w) = #{v : c(v w) > 0}, N1+(. v w) = #{u : c(u v w) > 0}:
  unigram (add-one, Laplace):  P(w) = (c(w) + 1) / (M + V), M training tokens.
  interpolated Kneser-Ney (Chen & Goodman 1998), one discount D at every order:
  P1(w)       = [max(N1+(. w) - D, 0) + D * #{w' : N1+(. w') > 0} / V] / N1+(. .)      (continuation unigram,
                interpolated with the uniform 1/V, so every token has non-zero probability)
  P2(w | v)   = [max(c(v w) - D, 0) + D * N1+(v .) * P1(w)] / c(v .)                    (the bigram model)
  P2c(w | v)  = [max(N1+(. v w) - D, 0) + D * #{w' : N1+(. v w') > 0} * P1(w)] / N1+(. v .)
                (the trigram's middle order, on continuation counts)
  P3(w | u v) = [max(c(u v w) - D, 0) + D * N1+(u v .) * P2c(w | v)] / c(u v .)         (the trigram model)
An unseen context (zero denominator) falls through to the next lower order entirely.

Example:
    .venv/bin/python -m bench.baselines data/cache/kjv --seq-len 128 --val-tokens 8192
"""

import argparse
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from data.config import DataConfig
from data.loader import TokenData

FORMAT_VERSION = 1
CACHE_FILE = "ngram_baselines.json"


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query (keys sorted, unique), else 0."""
    if len(keys) == 0:
        return np.zeros(np.shape(query), dtype=values.dtype)
    idx = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[idx] == query, values[idx], 0)


@dataclass
class KneserNey:
    """Counts of one training corpus (see the module docstring for the formulas); build with fit()."""
    V: int
    D: float
    laplace: np.ndarray  # (V,) add-one unigram
    p1: np.ndarray  # (V,) continuation unigram interpolated with uniform
    big_keys: np.ndarray  # sorted v*V+w with c(v w) > 0, and their counts
    big_counts: np.ndarray
    big_total: np.ndarray  # (V,) c(v .)
    big_types: np.ndarray  # (V,) N1+(v .)
    mid_keys: np.ndarray  # sorted v*V+w with N1+(. v w) > 0, and N1+(. v w)
    mid_counts: np.ndarray
    mid_total: np.ndarray  # (V,) N1+(. v .)
    mid_types: np.ndarray  # (V,) #{w : N1+(. v w) > 0}
    tri_keys: np.ndarray  # sorted (u*V+v)*V+w with c(u v w) > 0, and their counts
    tri_counts: np.ndarray
    hist_keys: np.ndarray  # sorted u*V+v with c(u v .) > 0, c(u v .) and N1+(u v .)
    hist_total: np.ndarray
    hist_types: np.ndarray

    @classmethod
    def fit(cls, tokens: np.ndarray, vocab_size: int, discount: float = 0.75) -> "KneserNey":
        V, D = int(vocab_size), float(discount)
        t = np.asarray(tokens).astype(np.int64).ravel()
        if not 0 < D <= 1:
            raise ValueError(f"discount must be in (0, 1], got {D}")
        if V < 2 or V ** 3 >= 2 ** 63:
            raise ValueError(f"vocab_size {V}: need 2 <= V < 2**21 (trigram keys are int64)")
        if len(t) < 3 or t.min() < 0 or t.max() >= V:
            raise ValueError(f"training tokens: need >= 3 ids in [0, {V}), got {len(t)} tokens")
        laplace = (np.bincount(t, minlength=V) + 1.0) / (len(t) + V)
        big_keys, big_counts = np.unique(t[:-1] * V + t[1:], return_counts=True)
        cont = np.bincount(big_keys % V, minlength=V)
        p1 = (np.maximum(cont - D, 0) + D * np.count_nonzero(cont) / V) / len(big_keys)
        tri_keys, tri_counts = np.unique((t[:-2] * V + t[1:-1]) * V + t[2:], return_counts=True)
        mid_keys, mid_counts = np.unique(tri_keys % (V * V), return_counts=True)  # tri_keys unique: 1 per u
        hist_keys, first, hist_types = np.unique(tri_keys // V, return_index=True, return_counts=True)
        return cls(V, D, laplace, p1, big_keys, big_counts,
                   np.bincount(big_keys // V, weights=big_counts, minlength=V),
                   np.bincount(big_keys // V, minlength=V), mid_keys, mid_counts,
                   np.bincount(mid_keys // V, weights=mid_counts, minlength=V),
                   np.bincount(mid_keys // V, minlength=V), tri_keys, tri_counts,
                   hist_keys, np.add.reduceat(tri_counts, first), hist_types)

    def _interpolate(self, count, total, types, lower):
        """[max(count - D, 0) + D * types * lower] / total, or lower where total == 0 (unseen context)."""
        p = (np.maximum(count - self.D, 0) + self.D * types * lower) / np.maximum(total, 1)
        return np.where(total > 0, p, lower)

    def unigram(self, w):
        return self.laplace[w]

    def bigram(self, v, w):
        v, w = np.broadcast_arrays(np.asarray(v, np.int64), np.asarray(w, np.int64))
        return self._interpolate(_lookup(self.big_keys, self.big_counts, v * self.V + w),
                                 self.big_total[v], self.big_types[v], self.p1[w])

    def trigram(self, u, v, w):
        """P3(w | u v); u < 0 marks a window start (one token of context): the bigram model P2(w | v)."""
        u, v, w = np.broadcast_arrays(*(np.asarray(a, np.int64) for a in (u, v, w)))
        V = self.V
        middle = self._interpolate(_lookup(self.mid_keys, self.mid_counts, v * V + w),
                                   self.mid_total[v], self.mid_types[v], self.p1[w])
        h = np.maximum(u, 0) * V + v
        p = self._interpolate(_lookup(self.tri_keys, self.tri_counts, h * V + w),
                              _lookup(self.hist_keys, self.hist_total, h),
                              _lookup(self.hist_keys, self.hist_types, h), middle)
        return np.where(u < 0, self.bigram(v, w), p)

    def cross_entropies(self, windows: np.ndarray) -> dict[str, float]:
        """Mean -log P over the targets w[:, 1:] of (N, T + 1) windows, context from the same window only."""
        w = np.asarray(windows).astype(np.int64)
        if w.ndim != 2 or w.shape[1] < 2 or w.size == 0 or w.min() < 0 or w.max() >= self.V:
            raise ValueError(f"windows: need an (N, T + 1) array of ids in [0, {self.V}), got {w.shape}")
        prev2 = np.concatenate([np.full((len(w), 1), -1), w[:, :-2]], axis=1)  # -1: no token (t = 0)
        prev, target = w[:, :-1], w[:, 1:]
        return {"unigram": float(-np.log(self.unigram(target)).mean()),
                "bigram": float(-np.log(self.bigram(prev, target)).mean()),
                "trigram": float(-np.log(self.trigram(prev2, prev, target)).mean())}


def kn_probabilities(model: KneserNey, context: tuple[int, ...]) -> np.ndarray:
    """The full (V,) distribution the scoring uses after `context`: () Laplace unigram, (v,) P2(. | v),
    (u, v) P3(. | u v)."""
    w = np.arange(model.V)
    if len(context) == 0:
        return model.unigram(w)
    if len(context) == 1:
        return model.bigram(context[0], w)
    return model.trigram(context[-2], context[-1], w)


def ngram_cross_entropies(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int,
                          discount: float = 0.75) -> dict[str, float]:
    """{"unigram", "bigram", "trigram"}: validation cross-entropy (nats per token) of the three models."""
    return KneserNey.fit(train_tokens, vocab_size, discount).cross_entropies(windows)


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # missing or corrupt: recomputed and rewritten
        return {}


def _write_cache(path: str, cache: dict) -> None:
    """Atomically (temp file in the same directory + os.replace); an unwritable directory skips caching."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ngram_baselines.", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def baselines(data: TokenData, seq_len: int, val_batch_size: int = 16, cache: bool = True,
              discount: float = 0.75) -> dict:
    """The three baselines of a data set on its evaluated validation tokens at seq_len (a TokenData of
    another seq_len is reopened at this one), cached in <data dir>/ngram_baselines.json."""
    if seq_len != data.seq_len:
        data = TokenData(data.dir, data.cfg, seq_len)
    config = {"identity": data.identity(), "seq_len": seq_len, "val_tokens": data.num_val_tokens,
              "vocab_size": data.cfg.vocab_size, "discount": discount, "version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(data.dir, CACHE_FILE)
    stored = _read_cache(path) if cache else {}
    entry = stored.get(key)
    fields = ("unigram", "bigram", "trigram", "discount", "val_tokens", "train_tokens")
    if isinstance(entry, dict) and all(k in entry for k in fields):
        return {**{k: entry[k] for k in fields}, "cached": True}
    train = np.concatenate([np.asarray(t) for t in data.train])
    windows = np.concatenate([np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1)
                              for x, y in data.val_batches(val_batch_size)])
    out = {**ngram_cross_entropies(train, windows, data.cfg.vocab_size, discount), "discount": discount,
           "val_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "train_tokens": len(train)}
    if cache:
        stored[key] = {**out, "config": config}
        _write_cache(path, stored)
    return {**out, "cached": False}


def ngram_flag(reference_loss: float | None, base: dict) -> str | None:
    """A note when the reference optimizer's final validation loss does not beat the n-gram baselines
    (None for a missing or non-finite loss: a diverged run is reported elsewhere)."""
    if reference_loss is None or not math.isfinite(reference_loss):
        return None
    x, bigram, trigram = float(reference_loss), base["bigram"], base["trigram"]
    if x > bigram:
        return (f"measures n-gram learning, not optimization of a language model: the reference arm ends at "
                f"{x:.4f}, above the bigram baseline {bigram:.4f}")
    if x > trigram:
        return (f"the reference arm ends at {x:.4f}, below the bigram baseline {bigram:.4f} but above the "
                f"trigram baseline {trigram:.4f}")
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Unigram/bigram/trigram validation cross-entropy (nats/token).")
    p.add_argument("data_dir")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--val-tokens", type=int, default=DataConfig.val_tokens)
    p.add_argument("--vocab-size", type=int, default=None, help="default: meta.json's, else 4096")
    p.add_argument("--train-pattern", default=DataConfig.train_pattern)
    p.add_argument("--val-pattern", default=DataConfig.val_pattern)
    p.add_argument("--discount", type=float, default=0.75)
    p.add_argument("--no-cache", action="store_true")
    a = p.parse_args(argv)
    vocab = a.vocab_size
    if vocab is None:
        meta = os.path.join(a.data_dir, "meta.json")
        vocab = DataConfig.vocab_size
        if os.path.exists(meta):
            with open(meta) as f:
                vocab = json.load(f)["tokenizer"]["vocab_size"]
    cfg = DataConfig(name=os.path.basename(os.path.normpath(a.data_dir)), dir=a.data_dir, vocab_size=vocab,
                     val_tokens=a.val_tokens, train_pattern=a.train_pattern, val_pattern=a.val_pattern)
    out = baselines(TokenData(a.data_dir, cfg, a.seq_len), a.seq_len, cache=not a.no_cache,
                    discount=a.discount)
    for name in ("unigram", "bigram", "trigram"):
        print(f"{name:8s} {out[name]:.6f} nats/token")


if __name__ == "__main__":
    main()
