"""Tests of the data package: corpus pin and split, tokenizer and prepare determinism, shard format, loader.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from data.config import DataConfig
from data.corpus import KJV_SHA256, kjv_documents, kjv_path
from data.loader import TokenData
from data.prepare import prepare_kjv
from data.shards import HEADER_BYTES, DataError, open_shard, write_shard
from data.tokenizer import EOT, save_tokenizer, train_bpe

SHARD_TOKENS = 300_000  # small, so the 985,775 training tokens span 4 shards and the loader sees several
TRAIN_TOKENS, VAL_TOKENS = 985_775, 51_051  # KJV at vocab 4096, EOT before each chapter included
CONF = os.path.join(os.path.dirname(__file__), "..", "conf", "data")


@pytest.fixture(scope="session")
def kjv(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kjv"))
    meta = prepare_kjv(out, vocab_size=4096, shard_tokens=SHARD_TOKENS, num_proc=2)
    return out, meta


def make_data(kjv, seq_len=64, **cfg) -> TokenData:
    return TokenData(kjv[0], DataConfig(dir=kjv[0], **cfg), seq_len)


# ---- corpus -------------------------------------------------------------------------------------------

def test_kjv_split_counts():
    train, val = kjv_documents()
    assert (len(train), len(val)) == (1130, 59)
    assert sum(map(len, train + val)) == 4_136_263  # 4,106,349 verse characters + 29,914 joining newlines
    assert train[0].startswith("In the beginning God created the heaven and the earth.\nAnd the earth")
    assert val[0].startswith("And Abraham journeyed from thence")  # chapter index 19 = Genesis 20


def test_kjv_pin_rejects_modified_copy(tmp_path):
    copy = tmp_path / "kjv.jsonl"
    data = Path(kjv_path()).read_bytes()
    assert hashlib.sha256(data).hexdigest() == KJV_SHA256
    copy.write_bytes(data.replace(b"In the beginning", b"In the Beginning", 1))
    with pytest.raises(DataError) as err:
        kjv_documents(str(copy))
    message = str(err.value)
    assert str(copy) in message and KJV_SHA256 in message
    assert hashlib.sha256(copy.read_bytes()).hexdigest() in message


# ---- tokenizer and prepare ----------------------------------------------------------------------------

def test_tokenizer_is_deterministic(kjv, tmp_path):
    out, meta = kjv
    tok = train_bpe(kjv_documents()[0], 4096)
    assert save_tokenizer(tok, str(tmp_path / "tokenizer.json")) == meta["tokenizer"]["sha256"]
    assert (tmp_path / "tokenizer.json").read_bytes() == Path(out, "tokenizer.json").read_bytes()
    assert (tok.get_vocab_size(), tok.token_to_id(EOT)) == (4096, 0)
    text = "And God said, Let there be light: and there was light."
    assert tok.decode(tok.encode(text).ids) == text


def test_prepare_outputs(kjv):
    out, meta = kjv
    assert [r["tokens"] for r in meta["train_shards"]] == [300_000, 300_000, 300_000, 85_775]
    assert (meta["train_tokens"], meta["val_tokens"]) == (TRAIN_TOKENS, VAL_TOKENS)
    assert meta["format"] == {"header_int32": 256, "token_dtypes": ["uint16"]}
    assert meta["tokenizer"] == {"file": "tokenizer.json", "sha256": meta["tokenizer"]["sha256"],
                                 "vocab_size": 4096, "eot_id": 0}
    assert (meta["source_sha256"], meta["max_token_id"]) == (KJV_SHA256, 4095)
    train = np.concatenate([open_shard(os.path.join(out, r["file"])) for r in meta["train_shards"]])
    assert (train == 0).sum() == 1130  # one EOT before each training chapter
    val = open_shard(os.path.join(out, "val_000000.bin"))
    assert val[0] == 0 and (val == 0).sum() == 59


def test_prepare_is_deterministic(kjv, tmp_path):
    out, meta = kjv
    again = prepare_kjv(str(tmp_path), vocab_size=4096, shard_tokens=SHARD_TOKENS, num_proc=1)
    assert again == meta  # every shard sha256, the tokenizer sha256, the entropy, the arguments
    for name in ["tokenizer.json", "meta.json"] + [r["file"] for r in meta["train_shards"] + meta["val_shards"]]:
        assert Path(out, name).read_bytes() == (tmp_path / name).read_bytes()


def test_prepare_is_cached_and_rebuilds_damage(kjv, tmp_path, capsys):
    out, meta = kjv
    mtime = os.path.getmtime(os.path.join(out, "train_000000.bin"))
    assert prepare_kjv(out, vocab_size=4096, shard_tokens=SHARD_TOKENS) == meta
    assert "up to date" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "train_000000.bin")) == mtime
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    with open(os.path.join(copy, "val_000000.bin"), "r+b") as f:
        f.truncate(HEADER_BYTES + 100)
    assert prepare_kjv(copy, vocab_size=4096, shard_tokens=SHARD_TOKENS) == meta
    assert "up to date" not in capsys.readouterr().out


def test_unigram_entropy_matches_numpy(kjv):
    out, meta = kjv
    train = np.concatenate([open_shard(os.path.join(out, r["file"])) for r in meta["train_shards"]])
    p = np.unique(train, return_counts=True)[1] / train.size
    # fp64 sums of len(p) ~ 4,096 positive terms: the worst case len(p) eps64 = 9e-13 relative
    assert meta["unigram_entropy_nats"] == pytest.approx(-(p * np.log(p)).sum(), rel=len(p) * np.finfo(float).eps)
    assert meta["unigram_entropy_nats"] == pytest.approx(5.9958, abs=1e-4)  # the stated value, rounded


# ---- shards -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("top, dtype, magic, version", [(65_535, np.uint16, 20240520, 1),
                                                         (65_536, np.uint32, 20240801, 7)])
def test_shard_round_trip(tmp_path, top, dtype, magic, version):
    tokens = np.array([0, 7, 50256, top, 1], dtype=np.int64)
    path = str(tmp_path / "s.bin")
    sha = write_shard(path, tokens)
    assert sha == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    back = open_shard(path)
    assert back.dtype == dtype and back.tolist() == tokens.tolist()
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [magic, version, 5] and not header[3:].any()
    assert os.path.getsize(path) == 1024 + 5 * np.dtype(dtype).itemsize


def test_written_shard_reads_like_modded_nanogpt(tmp_path):
    path = str(tmp_path / "fineweb_val_000000.bin")
    write_shard(path, np.arange(1000) * 50)
    # modded-nanogpt's _load_data_shard: the header checks, then the uint16 tokens after 256 * 4 bytes.
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (20240520, 1, 1000)
    with open(path, "rb") as f:
        f.seek(256 * 4)
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert tokens.tolist() == list(range(0, 50_000, 50))


def _corrupt(path, case):
    data = bytearray(Path(path).read_bytes())
    if case == "missing":
        os.remove(path)
        return
    if case == "truncated":
        data = data[:-1]
    elif case == "short header":
        data = data[:100]
    elif case == "wrong magic":
        data[:4] = np.int32(12345).tobytes()
    elif case == "wrong version":
        data[4:8] = np.int32(2).tobytes()
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("case, words", [("missing", "missing"), ("truncated", "truncated"),
                                         ("short header", "truncated"), ("wrong magic", "magic 12345"),
                                         ("wrong version", "version 2")])
def test_corrupt_shard_is_rejected(tmp_path, case, words):
    path = str(tmp_path / "train_000000.bin")
    write_shard(path, np.arange(100))
    _corrupt(path, case)
    with pytest.raises(DataError) as err:
        open_shard(path)
    assert str(err.value).startswith(path) and words in str(err.value) and "\n" not in str(err.value)


# ---- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.stem for p in Path(CONF).glob("*.yaml")))
def test_data_configs_compose(name):
    cfg = OmegaConf.to_object(OmegaConf.merge(DataConfig, OmegaConf.load(os.path.join(CONF, f"{name}.yaml"))))
    cfg.validate()
    assert isinstance(cfg, DataConfig) and cfg.name == name


@pytest.mark.parametrize("key, value", [("vocab_size", 0), ("val_tokens", 0), ("seed", -1), ("dir", "")])
def test_data_config_rejects_impossible_values(key, value):
    with pytest.raises(ValueError, match=f"data.{key}: "):
        DataConfig(**{key: value}).validate()


# ---- loader -------------------------------------------------------------------------------------------

def test_loader_fails_fast_without_shards(tmp_path):
    cfg = DataConfig(dir=str(tmp_path))
    with pytest.raises(DataError) as err:
        TokenData(str(tmp_path), cfg, 64)
    assert str(err.value) == (f"{tmp_path / 'train_*.bin'}: no shard matches; build the data with: "
                              f"python -m data.prepare kjv --out {tmp_path} --vocab-size 4096")


def test_loader_rejects_a_corrupt_shard_and_a_wrong_vocab(kjv, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(kjv[0], copy)
    with pytest.raises(DataError, match="vocab_size 4096 differs"):
        TokenData(copy, DataConfig(vocab_size=8192), 64)
    _corrupt(os.path.join(copy, "train_000002.bin"), "truncated")
    with pytest.raises(DataError, match="train_000002.bin: .*truncated"):
        TokenData(copy, DataConfig(), 64)


def test_train_batch_is_pure_and_seeded(kjv):
    a, b = make_data(kjv), make_data(kjv)
    x, y = a.train_batch(7, 1, 4, 2)
    assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    a.train_batch(500, 0, 4, 2)  # other calls in between change nothing
    assert torch.equal(a.train_batch(7, 1, 4, 2)[0], x) and torch.equal(b.train_batch(7, 1, 4, 2)[0], x)
    assert not torch.equal(a.train_batch(8, 1, 4, 2)[0], x)
    assert not torch.equal(make_data(kjv, seed=1).train_batch(7, 1, 4, 2)[0], x)


def test_train_windows_are_the_shard_tokens(kjv):
    data = make_data(kjv)
    x, y = data.train_batch(3, 0, 8, 1)
    for row, (shard, k) in enumerate(data.windows(data.positions(3, 0, 8, 1))):
        window = np.asarray(data.train[shard][k * 64:k * 64 + 65])
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()


def test_one_epoch_visits_every_window_once(kjv):
    data = make_data(kjv)
    W = data.windows_per_epoch
    assert data.windows_per_shard.tolist() == [4687, 4687, 4687, 1340]  # (tokens - 1) // 64
    for epoch in range(2):
        seen = data.windows(np.arange(epoch * W, (epoch + 1) * W))
        everything = {(s, k) for s, n in enumerate(data.windows_per_shard) for k in range(n)}
        assert len({tuple(w) for w in seen.tolist()}) == W and {tuple(w) for w in seen.tolist()} == everything
    assert not np.array_equal(data.windows(np.arange(10)), data.windows(np.arange(W, W + 10)))


def test_ranks_and_micro_batches_partition_the_global_batch(kjv):
    data = make_data(kjv)
    step, micro_bs, grad_accum, world = 5, 3, 2, 2
    parts = [data.train_batch(step, m, micro_bs, grad_accum, r, world)[0]
             for m in range(grad_accum) for r in range(world)]
    single = [data.train_batch(step, m, micro_bs, grad_accum * world)[0] for m in range(grad_accum * world)]
    assert torch.equal(torch.cat(parts), torch.cat(single))
    G = micro_bs * grad_accum * world
    positions = np.concatenate([data.positions(step, m, micro_bs, grad_accum, r, world)
                                for m in range(grad_accum) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(step * G, (step + 1) * G))


def test_val_batches_are_fixed(kjv):
    a, b = make_data(kjv, seq_len=100), make_data(kjv, seq_len=100, seed=3)
    assert a.num_val_tokens == 49_100  # 49,152 // 100 windows of 100 tokens
    batches_a, batches_b = list(a.val_batches(64)), list(b.val_batches(64))
    assert [x.shape[0] for x, _ in batches_a] == [64] * 7 + [43]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b))
    y = torch.cat([y for _, y in batches_a]).flatten()
    assert y.numel() == a.num_val_tokens
    val = open_shard(os.path.join(kjv[0], "val_000000.bin"))
    assert y.tolist() == val[1:49_101].tolist()


def test_identity_and_meta(kjv):
    meta = kjv[1]
    data = make_data(kjv)
    assert data.identity() == {"corpus": "kjv", "tokenizer_sha256": meta["tokenizer"]["sha256"],
                               "train_shards": [r["sha256"] for r in meta["train_shards"]],
                               "val_shards": [meta["val_shards"][0]["sha256"]], "val_tokens": 49152}
    assert (data.max_token_id, data.unigram_entropy_nats) == (4095, meta["unigram_entropy_nats"])


def test_identity_without_meta(kjv, tmp_path):
    for name in ["train_000000.bin", "val_000000.bin"]:
        shutil.copy(os.path.join(kjv[0], name), tmp_path / name)
    data = TokenData(str(tmp_path), DataConfig(name="bare"), 64)
    assert data.meta is None and data.unigram_entropy_nats is None and data.max_token_id == 4095
    assert data.identity()["train_shards"] == [{"file": "train_000000.bin", "bytes": 1024 + 600_000,
                                                "tokens": 300_000, "dtype": "uint16"}]


def test_batch_is_fast(kjv):
    data = make_data(kjv, seq_len=256)
    data.train_batch(0, 0, 16, 1)
    start = time.perf_counter()
    for step in range(200):
        data.train_batch(step, 0, 16, 1)
    assert (time.perf_counter() - start) / 200 < 1e-3  # measured: about 0.06 ms; 16x, a guard, not a measurement


def test_prepare_hf_routes_the_stream_offline(kjv, tmp_path, monkeypatch):
    """The `hf` path with load_dataset replaced by a local stream: val = the first val_tokens tokens."""
    import datasets

    from data.prepare import prepare_hf

    docs = kjv_documents()[1]
    stream = datasets.Dataset.from_dict({"body": docs, "id": list(range(len(docs)))}).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: stream)
    meta = prepare_hf(str(tmp_path), "local/kjv-val", os.path.join(kjv[0], "tokenizer.json"), text_column="body",
                      max_tokens=30_000, val_tokens=10_000, shard_tokens=8_000)
    assert [r["tokens"] for r in meta["val_shards"]] == [8_000, 2_000]
    assert [r["tokens"] for r in meta["train_shards"]] == [8_000, 8_000, 8_000, 6_000]
    tokens = np.concatenate([open_shard(str(tmp_path / r["file"])) for r in meta["val_shards"] + meta["train_shards"]])
    val = open_shard(os.path.join(kjv[0], "val_000000.bin"))  # the same documents, tokenized by `kjv`
    assert tokens.tolist() == val[:40_000].tolist()
    assert meta["corpus"] == "hf:local/kjv-val:train" and meta["source_sha256"] is None
