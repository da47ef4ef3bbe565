"""bench/baselines.py: n-gram sanity baselines, checked against hand-computed numbers, normalization, the
real KJV data (an independent unigram) and the JSON cache."""

import json
import math
import os
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from bench import baselines as bl
from data.config import DataConfig
from data.loader import TokenData
from data.shards import open_shard, write_shard

REPO = Path(__file__).resolve().parent.parent
KJV = REPO / "data" / "cache" / "kjv"

# Toy corpus: vocabulary 5 (token 4 never occurs in training), 10 training tokens, two windows of T = 3.
TRAIN = np.array([0, 1, 2, 0, 1, 3, 0, 2, 1, 0])
WINDOWS = np.array([[0, 1, 3, 0], [4, 0, 2, 4]])
D = F(3, 4)


def ce(probs):
    return -sum(math.log(p) for p in probs) / len(probs)


def hand_probabilities():
    """The toy model's probabilities, counted by hand (see the comments), as exact fractions."""
    # Unigram counts c(0..4) = 4, 3, 2, 1, 0 of M = 10; Laplace (c + 1) / (10 + 5).
    lap = [F(5, 15), F(4, 15), F(3, 15), F(2, 15), F(1, 15)]
    # Bigram types: (0,1)x2 (1,2) (2,0) (1,3) (3,0) (0,2) (2,1) (1,0): N1+(. .) = 8.
    # N1+(. w) for w = 0..4: 3 {1,2,3}, 2 {0,2}, 2 {0,1}, 1 {1}, 0; 4 tokens seen, D * 4 / 5 = 3/5.
    p1 = [(max(n - D, 0) + D * F(4, 5)) / 8 for n in (3, 2, 2, 1, 0)]
    assert p1 == [F(57, 160), F(37, 160), F(37, 160), F(17, 160), F(12, 160)]
    # c(v .): 0 -> 3, 1 -> 3, 2 -> 2, 3 -> 1, 4 -> 0; N1+(v .): 0 -> 2, 1 -> 3, 2 -> 2, 3 -> 1.
    # Trigram types (all count 1): 012 120 201 013 130 302 021 210; histories c(u v .) = N1+(u v .):
    # (0,1) -> 2, the others 1. Middle continuation N1+(. v w) = 1 for vw in 12 20 01 13 30 02 21 10,
    # so N1+(. v .) and its type count: v=0 -> 2, v=1 -> 3, v=2 -> 2, v=3 -> 1.
    # Window 1 = [0, 1, 3, 0]:
    b1 = (2 - D + D * 2 * p1[1]) / 3  # P2(1 | 0); the trigram at t = 0 uses P2 too
    b2 = (1 - D + D * 3 * p1[3]) / 3  # P2(3 | 1)
    m2 = (1 - D + D * 3 * p1[3]) / 3  # P2c(3 | 1), continuation counts (equal to P2 here)
    t2 = (1 - D + D * 2 * m2) / 2  # P3(3 | 0 1)
    b3 = (1 - D + D * 1 * p1[0]) / 1  # P2(0 | 3)
    m3 = (1 - D + D * 1 * p1[0]) / 1  # P2c(0 | 3)
    t3 = (1 - D + D * 1 * m3) / 1  # P3(0 | 1 3)
    # Window 2 = [4, 0, 2, 4]:
    b4 = p1[0]  # P2(0 | 4): context 4 unseen -> P1(0); the trigram (t = 0) the same
    b5 = (1 - D + D * 2 * p1[2]) / 3  # P2(2 | 0): raw count c(0 2) = 1 of c(0 .) = 3
    m5 = (1 - D + D * 2 * p1[2]) / 2  # P2c(2 | 0): N1+(. 0 2) = 1 of N1+(. 0 .) = 2
    t5 = m5  # P3(2 | 4 0): history (4, 0) unseen -> P2c(2 | 0)
    b6 = (0 + D * 2 * p1[4]) / 2  # P2(4 | 2): c(2 4) = 0
    m6 = (0 + D * 2 * p1[4]) / 2  # P2c(4 | 2)
    t6 = (0 + D * 1 * m6) / 1  # P3(4 | 0 2): history (0, 2) seen once, c(0 2 4) = 0
    return {"unigram": [lap[1], lap[3], lap[0], lap[0], lap[2], lap[4]],
            "bigram": [b1, b2, b3, b4, b5, b6], "trigram": [b1, t2, t3, b4, t5, t6]}


def test_hand_computed_toy_corpus():
    expected = hand_probabilities()
    got = bl.ngram_cross_entropies(TRAIN, WINDOWS, vocab_size=5, discount=0.75)
    assert set(got) == {"unigram", "bigram", "trigram"}
    for name, probs in expected.items():
        assert got[name] == pytest.approx(ce(probs), abs=1e-12), name
    # Spot checks of single probabilities through the same code path.
    m = bl.KneserNey.fit(TRAIN, 5, 0.75)
    assert bl.kn_probabilities(m, (0,))[1] == pytest.approx(float(expected["bigram"][0]), abs=1e-15)
    assert bl.kn_probabilities(m, (4, 0))[2] == pytest.approx(float(expected["trigram"][4]), abs=1e-15)
    assert bl.kn_probabilities(m, (0, 2))[4] == pytest.approx(float(expected["trigram"][5]), abs=1e-15)


def test_no_context_across_windows():
    # One window [a b c d] vs the same tokens split at c: the split's second window starts at c with no context.
    one = bl.ngram_cross_entropies(TRAIN, np.array([[0, 1, 2, 0, 1]]), 5)
    two = bl.ngram_cross_entropies(TRAIN, np.array([[0, 1, 2], [2, 0, 1]]), 5)
    assert one["unigram"] == pytest.approx(two["unigram"], abs=1e-12)
    assert one["bigram"] == pytest.approx(two["bigram"], abs=1e-12)
    m = bl.KneserNey.fit(TRAIN, 5)
    p = [m.bigram(0, 1), m.trigram(0, 1, 2), m.trigram(1, 2, 0), m.trigram(2, 0, 1)]
    assert one["trigram"] == pytest.approx(ce(p), abs=1e-12)
    p[2] = m.bigram(2, 0)  # window start of the second window: bigram only
    assert two["trigram"] == pytest.approx(ce(p), abs=1e-12)
    assert one["trigram"] != pytest.approx(two["trigram"], abs=1e-6)


@pytest.mark.parametrize("discount", [0.1, 0.75, 1.0])
def test_distributions_sum_to_one(discount):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 40, size=2000) % 37  # tokens 37..49 of a 50-vocab never occur
    model = bl.KneserNey.fit(train, 50, discount)
    seen = train[100:103]
    contexts = [(), (int(seen[0]),), (45,), (int(seen[0]), int(seen[1])), (45, int(seen[1])), (45, 46),
                (int(seen[1]), 45)]
    for ctx in contexts:
        p = bl.kn_probabilities(model, ctx)
        assert p.shape == (50,) and p.min() > 0, ctx
        assert p.sum() == pytest.approx(1.0, abs=1e-12), ctx
    toy = bl.KneserNey.fit(TRAIN, 5, discount)
    for ctx in [(0,), (4,), (0, 1), (4, 0), (4, 4), (2, 1), (3, 3)]:
        assert bl.kn_probabilities(toy, ctx).sum() == pytest.approx(1.0, abs=1e-12), ctx


def test_bad_input():
    with pytest.raises(ValueError, match="discount"):
        bl.ngram_cross_entropies(TRAIN, WINDOWS, 5, discount=0.0)
    with pytest.raises(ValueError, match="windows"):
        bl.ngram_cross_entropies(TRAIN, WINDOWS, 4)  # token 4 is outside a vocabulary of 4
    with pytest.raises(ValueError, match="training tokens"):
        bl.ngram_cross_entropies(TRAIN[:2], WINDOWS, 5)


def kjv_data(seq_len=128):
    if not (KJV / "train_000000.bin").exists() or not (KJV / "meta.json").exists():
        pytest.skip("data/cache/kjv is absent; build it with `make data`")
    cfg = OmegaConf.to_object(OmegaConf.merge(DataConfig, OmegaConf.load(REPO / "conf/data/kjv.yaml")))
    cfg.dir, cfg.val_tokens = str(KJV), 8192  # conf/experiment/bench_micro.yaml: data.val_tokens
    return TokenData(str(KJV), cfg, seq_len)


def test_kjv_ordering_and_independent_unigram():
    data = kjv_data()
    out = bl.baselines(data, 128, cache=False)
    assert out["cached"] is False and out["val_tokens"] == 8192 and out["discount"] == 0.75
    assert out["unigram"] > out["bigram"] > out["trigram"] > 0
    # Independent unigram: bincount over the train shard, Laplace, targets = val tokens 1 .. 8192.
    train = np.concatenate([np.asarray(open_shard(str(f))) for f in sorted(KJV.glob("train_*.bin"))])
    val = np.asarray(open_shard(str(KJV / "val_000000.bin")))[:8193].astype(np.int64)
    assert out["train_tokens"] == len(train)
    p = (np.bincount(train, minlength=4096) + 1.0) / (len(train) + 4096)
    assert out["unigram"] == pytest.approx(float(-np.log(p[val[1:]]).mean()), abs=1e-9)
    # Exactly the evaluated windows: 64 windows of 129 tokens, overlapping by one.
    windows = val[np.arange(64)[:, None] * 128 + np.arange(129)]
    direct = bl.ngram_cross_entropies(train, windows, 4096)
    assert all(out[k] == pytest.approx(direct[k], abs=1e-12) for k in direct)


def toy_data(tmp_path, seq_len=32):
    rng = np.random.default_rng(1)
    write_shard(str(tmp_path / "train_000000.bin"), rng.integers(0, 16, size=3000))
    write_shard(str(tmp_path / "val_000000.bin"), rng.integers(0, 16, size=300))
    cfg = DataConfig(name="toy", dir=str(tmp_path), vocab_size=16, val_tokens=256)
    return TokenData(str(tmp_path), cfg, seq_len)


def test_cache(tmp_path):
    data = toy_data(tmp_path)
    path = tmp_path / bl.CACHE_FILE
    first = bl.baselines(data, 32)
    assert first["cached"] is False and path.exists() and first["val_tokens"] == 256
    second = bl.baselines(data, 32)
    assert second["cached"] is True
    assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    assert len(json.loads(path.read_text())) == 1
    # The key changes with seq_len (here 256 // 24 = 10 windows of 24: 240 tokens).
    other = bl.baselines(data, 24)
    assert other["cached"] is False and other["val_tokens"] == 240 and other["unigram"] != first["unigram"]
    assert len(json.loads(path.read_text())) == 2
    assert bl.baselines(data, 24)["cached"] is True
    # A corrupt file is ignored and replaced by valid JSON; no temp files are left behind.
    path.write_text("{not json")
    again = bl.baselines(data, 32)
    assert again["cached"] is False and again["unigram"] == first["unigram"]
    assert len(json.loads(path.read_text())) == 1 and bl.baselines(data, 32)["cached"] is True
    assert sorted(os.listdir(tmp_path)) == [bl.CACHE_FILE, "train_000000.bin", "val_000000.bin"]


def test_unwritable_dir_skips_cache(tmp_path, monkeypatch):
    data = toy_data(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(bl.tempfile, "mkstemp", refuse)
    out = bl.baselines(data, 32)
    assert out["cached"] is False and not (tmp_path / bl.CACHE_FILE).exists()
    assert bl.baselines(data, 32)["cached"] is False
    assert out["unigram"] == bl.baselines(data, 32, cache=False)["unigram"]


def test_ngram_flag():
    base = {"unigram": 6.0, "bigram": 4.0, "trigram": 3.5}
    msg = bl.ngram_flag(4.25, base)
    assert msg == ("measures n-gram learning, not optimization of a language model: the reference arm ends at "
                   "4.2500, above the bigram baseline 4.0000")
    assert "above the trigram baseline 3.5000" in bl.ngram_flag(3.75, base)
    assert not bl.ngram_flag(3.75, base).startswith("measures")
    assert bl.ngram_flag(3.25, base) is None
    assert bl.ngram_flag(None, base) is None and bl.ngram_flag(float("nan"), base) is None


def test_cli(tmp_path, capsys):
    data = toy_data(tmp_path)
    bl.main([str(tmp_path), "--seq-len", "32", "--val-tokens", "256", "--vocab-size", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["unigram", "bigram", "trigram"]
    assert float(lines[1].split()[1]) == pytest.approx(bl.baselines(data, 32)["bigram"], abs=1e-6)
